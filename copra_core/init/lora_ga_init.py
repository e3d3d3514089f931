"""``init.method = lora_ga``: the wiring of LoRA-GA's construction (``lora_ga.py``) into a run."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from copra_core.adapters import AdapterState
from copra_core.config import InitSettings
from copra_core.init import Initialiser
from copra_core.init.lora_ga import check_rank, init_offsets, lora_ga_state


class LoraGAInit(Initialiser):
    """Factors from the gradient's SVD; the base offset by ``-B0 A0`` so the initial model is unchanged."""

    needs_gradients = True

    def initial_state(
        self,
        state: Mapping[str, torch.Tensor],
        gradients: Mapping[str, torch.Tensor] | None,
        settings: InitSettings,
    ) -> AdapterState:
        if gradients is None:
            raise ValueError("init.method = lora_ga needs a gradient estimate")
        return lora_ga_state(state, gradients, settings.gamma, settings.svd)

    def check(self, state: Mapping[str, torch.Tensor]) -> None:
        check_rank(state)

    def offsets(self, transported: Mapping[str, torch.Tensor]) -> AdapterState:
        return init_offsets(transported)
