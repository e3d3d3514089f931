"""The allocation's downlink: send only the LoRA modules a client cannot rebuild itself.

Under a budgeted allocation most candidate modules are never trained: they keep the
seeded initial value every node builds from the run config (``ModelBundle``), with
B = 0. Sending them in every message cost as much as the full rank-r adapter (the
HeteroLoRA benchmark measured 7.7 MB down against 3.7 MB up per round before this), so
the server leaves out every module still bitwise equal to the seeded adapter, names the
omitted modules in the message, and adds a CRC32 of their values. The client fills them
in from its own seeded adapter and checks the CRC32: a node whose seeded adapter differs
(another library version, another config) fails loudly instead of training on different
weights. The adapter a client rebuilds is bitwise the one the server holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from copra_core.adapters import LORA_A, LORA_B, AdapterMismatchError, AdapterState, lora_modules, tensors_crc32
from copra_core.protocol import OMITTED


def as_sent(state: Mapping[str, torch.Tensor], transport_dtype: str) -> AdapterState:
    """``state`` as it arrives after the wire's dtype (fp32 values of a ``transport_dtype`` cast)."""
    dtype = getattr(torch, transport_dtype)
    return {key: value.to(dtype).to(torch.float32) for key, value in state.items()}


def untouched_modules(state: Mapping[str, torch.Tensor], seeded: Mapping[str, torch.Tensor]) -> list[str]:
    """LoRA modules of ``state`` whose factors are bitwise those of ``seeded``."""
    return [
        module
        for module in lora_modules(state)
        if all(module + f in seeded and torch.equal(state[module + f], seeded[module + f]) for f in (LORA_A, LORA_B))
    ]


def modules_checksum(state: Mapping[str, torch.Tensor], modules: Sequence[str]) -> int:
    """CRC32 of the modules' fp32 factors, in the order given (equal on equal values)."""
    return tensors_crc32(state[module + factor].float() for module in modules for factor in (LORA_A, LORA_B))


def without_modules(state: Mapping[str, torch.Tensor], modules: Sequence[str]) -> AdapterState:
    """``state`` less the LoRA factors of ``modules`` (what travels)."""
    left_out = {module + factor for module in modules for factor in (LORA_A, LORA_B)}
    return {key: value for key, value in state.items() if key not in left_out}


def fill_modules(
    received: Mapping[str, torch.Tensor], seeded: Mapping[str, torch.Tensor], modules: Sequence[str], crc32: int
) -> AdapterState:
    """The server's adapter: ``received`` plus ``modules`` taken from this node's ``seeded`` adapter.

    Raises ``AdapterMismatchError`` if a named module was also sent, is not in ``seeded``,
    or if the seeded values differ from the server's (CRC32).
    """
    keys = [module + factor for module in modules for factor in (LORA_A, LORA_B)]
    sent_anyway = sorted(k for k in keys if k in received)
    unknown = sorted(k for k in keys if k not in seeded)
    if sent_anyway or unknown:
        raise AdapterMismatchError(
            f"message's '{OMITTED}' record is inconsistent: sent anyway {sent_anyway[:3]}, "
            f"not in this node's adapter {unknown[:3]}"
        )
    local = modules_checksum(seeded, modules)
    if local != crc32:
        raise AdapterMismatchError(
            f"this node's seeded adapter differs from the server's in the {len(modules)} omitted modules "
            f"(CRC32 {local} != {crc32}): check that server and clients run the same model, lora.* config, "
            "seed and library versions"
        )
    return {**received, **{key: seeded[key].clone() for key in keys}}
