"""Adapter state: PEFT state dicts, their wire format and their on-disk export.

An adapter state is PEFT's ``get_peft_model_state_dict`` mapping: LoRA factors
(``...lora_A.weight`` r x d_in, ``...lora_B.weight`` d_out x r) plus the full weights of
``modules_to_save`` (the task head). Keys are adapter-name free, so they match what
``PeftModel.from_pretrained`` reads.

PEFT (and with it transformers) and Flower are imported inside the functions that need
them: the key helpers and constants here are what the aggregation rules and the shared
maths (``copra_core/lowrank.py``) use, and those must import without either.
"""

from __future__ import annotations

import copy
import os
import shutil
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from copra_core.atomic import give_default_modes, sibling_temp_path

if TYPE_CHECKING:  # type hints only: the functions below import PEFT and Flower when called
    from flwr.app import ArrayRecord
    from peft import PeftConfig, PeftModel

AdapterState = dict[str, torch.Tensor]

LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"


class AdapterMismatchError(ValueError):
    """An adapter's keys, shapes or dtypes do not match the expected adapter."""


def get_adapter_state(model: PeftModel) -> AdapterState:
    """A detached fp32 copy of the model's adapter state."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(model).items()}


def set_adapter_state(model: PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into the model; every adapter key must be present and shaped right."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    check_compatible(state, get_peft_model_state_dict(model), source="adapter")
    result = set_peft_model_state_dict(model, dict(state))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise AdapterMismatchError(f"adapter keys not loaded into the model: {sorted(unexpected)[:5]}")


def lora_modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Module prefixes that carry a LoRA pair, in key order."""
    return [key[: -len(LORA_A)] for key in state if key.endswith(LORA_A)]


def dense_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys that are not LoRA factors (fully trained modules such as the head)."""
    return [k for k in state if not (k.endswith(LORA_A) or k.endswith(LORA_B))]


def check_compatible(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Raise AdapterMismatchError naming missing/unexpected keys and shape mismatches."""
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    shapes = [
        f"{k}: {tuple(state[k].shape)} != {tuple(reference[k].shape)}"
        for k in sorted(set(state) & set(reference))
        if tuple(state[k].shape) != tuple(reference[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if shapes:
        problems.append(f"shape mismatches {shapes[:5]}")
    if problems:
        raise AdapterMismatchError(f"{source} does not match the global adapter: " + "; ".join(problems))


def tensors_crc32(tensors: Iterable[torch.Tensor]) -> int:
    """CRC32 of the tensors' bytes, in the order given: equal on bitwise-equal tensors."""
    crc = 0
    for tensor in tensors:
        crc = zlib.crc32(tensor.detach().to("cpu").contiguous().numpy().tobytes(), crc)
    return crc


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# ---------------------------------------------------------------------- wire format
def to_array_record(state: Mapping[str, torch.Tensor], transport_dtype: str = "float32") -> ArrayRecord:
    """Adapter -> Flower ArrayRecord (bf16 is not transportable: cast to fp32/fp16)."""
    from flwr.app import ArrayRecord

    dtype = getattr(torch, transport_dtype)
    return ArrayRecord({k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()})


def from_array_record(record: ArrayRecord) -> AdapterState:
    """Flower ArrayRecord -> fp32 adapter state (computation is always fp32)."""
    return {k: v.to(torch.float32) for k, v in record.to_torch_state_dict().items()}


def array_record_nbytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


# ---------------------------------------------------------------------- export
def export_adapter(
    model: PeftModel,
    state: Mapping[str, torch.Tensor],
    out_dir: Path,
    initial: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).

    ``initial``: the initial factors an initialisation cancelled by offsetting the base
    (LoRA-GA: ``W0' = W0 - s B0 A0``). They are folded into the adapter
    (``fold_initial_factors``), so the folder loads with ``PeftModel.from_pretrained`` on
    the ORIGINAL base and gives the trained model, at twice the rank.

    Atomic: written to a temporary sibling folder, then renamed into place, so an
    interrupted export never leaves a half-written adapter.
    """
    from copra_core.lora import ADAPTER_NAME

    set_adapter_state(model, state)
    if initial is None:
        return _write_folder(out_dir, lambda tmp: model.save_pretrained(str(tmp), safe_serialization=True))
    config = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    # Same scaling s at rank 2r: alpha / r (or alpha / sqrt(r) with rsLoRA) is kept.
    config.lora_alpha = config.lora_alpha * (2**0.5 if config.use_rslora else 2)
    config.r = 2 * config.r
    return write_adapter_folder(out_dir, config, fold_initial_factors(state, initial))


def write_adapter_folder(out_dir: Path, config: PeftConfig, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write ``config`` and ``tensors`` as a PEFT adapter folder, atomically."""

    def write(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file(
            {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()},
            str(tmp / "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )

    return _write_folder(out_dir, write)


def _write_folder(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write`` into a temporary sibling folder, then rename it to ``out_dir``.

    An interrupted export never leaves a half-written adapter; a previous folder is
    replaced only once the new one is complete.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_temp_path(out_dir)
    tmp.mkdir()  # mkdir, not mkdtemp: the folder gets 0o777 less the umask, not 0o700 (copra_core/atomic.py)
    try:
        write(tmp)
        give_default_modes(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def fold_initial_factors(state: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor]) -> AdapterState:
    """The rank-2r adapter ``[B, -B0] [A; A0] = B A - B0 A0``: ``state`` re-expressed on the original base."""
    out = {key: value.clone() for key, value in state.items()}
    for module in lora_modules(state):
        out[module + LORA_A] = torch.cat([state[module + LORA_A], initial[module + LORA_A]], dim=0)
        out[module + LORA_B] = torch.cat([state[module + LORA_B], -initial[module + LORA_B]], dim=1)
    return out
