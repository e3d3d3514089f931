"""Adapter initialisations, one module each, chosen by the config string ``init.method``.

As PEFT's ``init_lora_weights``: ``default`` keeps PEFT's initialisation (A random,
B = 0); ``lora_ga`` aligns the factors with a gradient estimate and offsets the base.
An initialisation runs once, before round 1; where its inputs come from (the server's
calibration sample or the clients) is the server's business (``server/initialisation.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from copra_core.adapters import AdapterState
from copra_core.config import ConfigError, InitSettings


class Initialiser(ABC):
    """Turns PEFT's seeded initial adapter into the run's initial adapter."""

    #: Whether ``initial_state`` needs the full-weight gradient estimate of every LoRA base layer.
    needs_gradients: bool = False

    @abstractmethod
    def initial_state(
        self,
        state: Mapping[str, torch.Tensor],
        gradients: Mapping[str, torch.Tensor] | None,
        settings: InitSettings,
    ) -> AdapterState:
        """The initial adapter (same keys and shapes as ``state``)."""

    def check(self, state: Mapping[str, torch.Tensor]) -> None:
        """Raise ConfigError before any work when the initialisation cannot apply to ``state``."""
        return None  # every adapter suits the default

    def offsets(self, transported: Mapping[str, torch.Tensor]) -> AdapterState:
        """Base offsets (``<module>.init_offset``) for the adapter as clients receive it (none by default)."""
        return {}


def initialiser(name: str) -> Initialiser:
    """The initialisation named by config key ``init.method``."""
    from copra_core.init.default import DefaultInit
    from copra_core.init.lora_ga_init import LoraGAInit

    known: dict[str, type[Initialiser]] = {"default": DefaultInit, "lora_ga": LoraGAInit}
    if name not in known:
        raise ConfigError(f"Config key 'init.method': unknown initialisation '{name}'; known: {sorted(known)}")
    return known[name]()
