"""Offsets of the frozen base weights, identical on every client.

Some methods change the frozen base as well as the adapter: FedEx-LoRA folds the part of
the exact update that factor averaging misses into it (the ``residual`` strategy), and
LoRA-GA starts from an offset base. A LoRA layer then computes

    W = W0 + s * (offset + B A)        (s = the layer's LoRA scaling)

with ``offset`` in the same unscaled units as ``B A``. There are two kinds, summed:

* ``<lora module>.base_offset``: a strategy's offset (part of the learned update);
* ``<lora module>.init_offset``: an initialisation's re-parameterisation (LoRA-GA's
  ``-B0 A0``), which only cancels the initial adapter. When CopRA drops a block's adapter
  it drops this part with it, so a dropped block computes ``W0 + s * base_offset``: the
  pre-trained weights plus what was learned, never half of LoRA-GA's cancellation.

Module names are as in the adapter state. Offsets travel in their own ArrayRecord next to
the adapter (``protocol.BASE_OFFSET``) and are applied to a copy of the original weights
every time, never accumulated in place: the same original weights and the same offset bytes give
bit-identical bases in every process (``checksum`` lets clients prove it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from copra_core.adapters import tensors_crc32
from copra_core.atomic import default_file_mode, sibling_temp_path

SUFFIX = ".base_offset"
INIT_SUFFIX = ".init_offset"


def module_of(key: str) -> str:
    for suffix in (SUFFIX, INIT_SUFFIX):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise KeyError(f"base offset key '{key}' ends with neither '{SUFFIX}' nor '{INIT_SUFFIX}'")


def split_offsets(offsets: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(strategy offsets, initialisation offsets), each keyed by module name."""
    learned = {module_of(k): v for k, v in offsets.items() if k.endswith(SUFFIX)}
    init = {module_of(k): v for k, v in offsets.items() if k.endswith(INIT_SUFFIX)}
    unknown = sorted(k for k in offsets if not k.endswith((SUFFIX, INIT_SUFFIX)))
    if unknown:
        module_of(unknown[0])  # raises, naming the key
    return learned, init


class BaseOffsets:
    """Applies offsets to one model's LoRA base layers, keeping their original weights."""

    def __init__(self) -> None:
        self._originals: dict[str, torch.Tensor] = {}
        # Modules with an initialisation offset: their layer (by id), learned and total offsets
        # and whether the adapter is on. Kept so CopRA can switch the init part per step.
        self._switchable: dict[int, tuple[str, nn.Module]] = {}
        self._learned: dict[str, torch.Tensor] = {}
        self._total: dict[str, torch.Tensor] = {}
        self._active: dict[str, bool] = {}
        self._applied: list[str] = []

    def apply(self, model: nn.Module, offsets: Mapping[str, torch.Tensor]) -> None:
        """Set every base weight to ``original + s * offset`` (``original`` where none is given).

        Every adapter counts as active afterwards (the whole offset is applied).
        """
        from copra_core.lora import ADAPTER_NAME  # here, not above: strategies/residual.py needs SUFFIX without PEFT

        learned, init = split_offsets(offsets)
        self._switchable.clear()
        self._learned.clear()
        self._total.clear()
        self._active.clear()
        self._applied = sorted(set(learned) | set(init))
        with torch.no_grad():
            for name in set(self._originals) - set(learned) - set(init):
                model.get_submodule(name).get_base_layer().weight.copy_(self._originals[name])
            for name in sorted(set(learned) | set(init)):
                layer = model.get_submodule(name)
                weight = layer.get_base_layer().weight
                if name not in self._originals:
                    self._originals[name] = weight.detach().clone()
                original = self._originals[name]
                for part in (learned.get(name), init.get(name)):
                    if part is not None and part.shape != original.shape:
                        raise ValueError(
                            f"base offset for '{name}' is {tuple(part.shape)}, weight {tuple(original.shape)}"
                        )
                scaling = layer.scaling[ADAPTER_NAME]
                learned_part = (
                    learned[name].to(original.device, original.dtype) if name in learned else torch.zeros_like(original)
                )
                total = learned_part + init[name].to(original.device, original.dtype) if name in init else learned_part
                weight.copy_(original + scaling * total)
                if name in init:
                    self._switchable[id(layer)] = (name, layer)
                    self._learned[name] = learned_part
                    self._total[name] = total
                    self._active[name] = True

    def follow_adapter(self, layer: nn.Module, active: bool) -> None:
        """Drop (or restore) a layer's initialisation offset together with its adapter (CopRA).

        Recomputed from the original weights each time, so the active base is bit-identical
        to the one ``apply`` set, however often a block was dropped.
        """
        entry = self._switchable.get(id(layer))
        if entry is None:
            return
        name, layer = entry
        if self._active[name] == active:
            return
        from copra_core.lora import ADAPTER_NAME  # see apply

        offset = self._total[name] if active else self._learned[name]
        with torch.no_grad():
            layer.get_base_layer().weight.copy_(self._originals[name] + layer.scaling[ADAPTER_NAME] * offset)
        self._active[name] = active

    def checksum(self, model: nn.Module) -> int:
        """CRC32 of the offset base weights (0 when none is offset): equal on equal bases.

        Over the modules the last ``apply`` offset, so processes whose models offset other
        modules before (another run of a sweep) still agree when their bases do.
        """
        return tensors_crc32(model.get_submodule(name).get_base_layer().weight for name in self._applied)


def save_offsets(offsets: Mapping[str, torch.Tensor], path: Path) -> Path:
    """Write offsets as safetensors, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_temp_path(path)
    try:
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in offsets.items()}, tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def apply_saved_offsets(model: nn.Module, path: Path) -> None:
    """Apply a run's ``base_offset.safetensors`` to a model loaded with ``PeftModel.from_pretrained``.

    Needed for adapters trained with a strategy that changes the base (``residual``):
    the adapter alone, on the original base, is not the model the run evaluated.
    """
    BaseOffsets().apply(model, load_file(str(path)))
