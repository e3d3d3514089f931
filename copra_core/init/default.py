"""PEFT's own LoRA initialisation (Kaiming-uniform A, zero B), seeded by the run."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from copra_core.adapters import AdapterState
from copra_core.config import InitSettings
from copra_core.init import Initialiser


class DefaultInit(Initialiser):
    """Keeps the adapter ``get_peft_model`` created; the base is not offset."""

    def initial_state(
        self,
        state: Mapping[str, torch.Tensor],
        gradients: Mapping[str, torch.Tensor] | None,
        settings: InitSettings,
    ) -> AdapterState:
        return {key: value.clone() for key, value in state.items()}
