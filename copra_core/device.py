"""Device choice: CUDA when present, else CPU; an explicit request is never downgraded."""

from __future__ import annotations

import torch

from copra_core.config import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Config key 'device' is '{name}' but CUDA is not available on this machine.")
    return device
