"""Offsets of the frozen base weights, identical on every client.

Some methods change the frozen base as well as the adapter: FedEx-LoRA folds the part of
the exact update that factor averaging misses into it (the ``residual`` strategy), and
LoRA-GA starts from an offset base. A LoRA layer then computes

    W = W0 + s * (offset + B A)        (s = the layer's LoRA scaling)

with ``offset`` in the same unscaled units as ``B A``. Offsets are keyed
``<lora module>.base_offset`` (module names as in the adapter state), travel in their
own ArrayRecord next to the adapter, and are applied to a copy of the original weights
every time, never accumulated in place: the same original weights and the same offset
bytes give bit-identical bases in every process (``checksum`` lets clients prove it).
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from copra_core.lora import ADAPTER_NAME

SUFFIX = ".base_offset"
#: Key of the offsets' ArrayRecord in Flower messages, next to the adapter's "arrays".
RECORD_KEY = "base-offset"


def module_of(key: str) -> str:
    if not key.endswith(SUFFIX):
        raise KeyError(f"base offset key '{key}' does not end with '{SUFFIX}'")
    return key[: -len(SUFFIX)]


class BaseOffsets:
    """Applies offsets to one model's LoRA base layers, keeping their original weights."""

    def __init__(self) -> None:
        self._originals: dict[str, torch.Tensor] = {}

    def apply(self, model: nn.Module, offsets: Mapping[str, torch.Tensor]) -> None:
        """Set every base weight to ``original + s * offset`` (``original`` where none is given)."""
        wanted = {module_of(key): value for key, value in offsets.items()}
        with torch.no_grad():
            for name in set(self._originals) - set(wanted):
                model.get_submodule(name).get_base_layer().weight.copy_(self._originals[name])
            for name, offset in wanted.items():
                layer = model.get_submodule(name)
                weight = layer.get_base_layer().weight
                if name not in self._originals:
                    self._originals[name] = weight.detach().clone()
                original = self._originals[name]
                if offset.shape != original.shape:
                    raise ValueError(
                        f"base offset for '{name}' is {tuple(offset.shape)}, weight {tuple(original.shape)}"
                    )
                weight.copy_(original + layer.scaling[ADAPTER_NAME] * offset.to(original.device, original.dtype))

    def checksum(self, model: nn.Module) -> int:
        """CRC32 of the offset base weights (0 when none is offset): equal on equal bases."""
        crc = 0
        for name in sorted(self._originals):
            weight = model.get_submodule(name).get_base_layer().weight.detach().to("cpu").contiguous()
            crc = zlib.crc32(weight.numpy().tobytes(), crc)
        return crc


def save_offsets(offsets: Mapping[str, torch.Tensor], path: Path) -> Path:
    """Write offsets as safetensors, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in offsets.items()}, tmp)
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
