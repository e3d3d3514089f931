"""FedEx-LoRA: average the factors and fold the residual into the frozen base, so the aggregate is exact."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from copra_core.adapters import LORA_A, LORA_B, lora_modules
from copra_core.base_offset import SUFFIX
from copra_core.lowrank import weighted_product_sum
from strategies.base import AdapterState, ClientUpdate, example_weights
from strategies.linear import LinearAveraging


class ResidualFold(LinearAveraging):
    """Factor averaging plus the residual ``sum_k w_k B_k A_k - B_bar A_bar`` in the base.

    The adapter is the linear average (``B_bar``, ``A_bar``); what that misses of the
    exact average update goes into an offset of the frozen base weights, accumulated
    over rounds: ``R_{t+1} = R_t + sum_k w_k B_k A_k - B_bar A_bar``. The global model
    ``W0 + s (R_{t+1} + B_bar A_bar)`` is then exactly the average of the clients'
    models ``W0 + s (R_t + B_k A_k)``. Singhal et al. 2025, FedEx-LoRA,
    https://arxiv.org/abs/2410.09432.

    The server sends ``R`` (full d_out x d_in per module, fp32) with every message and
    every client applies it to the original weights, so all bases are bit-identical
    (clients report a checksum; the server stops the run if two differ). The cost is
    that download: ``comm/bytes_down`` shows it. The run exports ``base_offset.safetensors``
    next to the adapter (``copra_core.base_offset.apply_saved_offsets``).
    """

    name = "residual"
    single_pass = False  # reads the updates twice: the average, then the residual

    def __init__(self) -> None:
        self.offsets: AdapterState = {}
        self.last_residual_norm = 0.0

    def aggregate(self, updates: Sequence[ClientUpdate], current: Mapping[str, torch.Tensor]) -> AdapterState:
        updates = list(updates)
        out = super().aggregate(updates, current)
        weights = example_weights(updates, self.name)
        squares = 0.0
        for module in lora_modules(current):
            # Dense on purpose: the residual is a d_out x d_in matrix that goes into the base.
            exact = weighted_product_sum(
                ((u.state[module + LORA_B], u.state[module + LORA_A]) for u in updates), weights
            )
            residual = exact - out[module + LORA_B].double() @ out[module + LORA_A].double()
            key = module + SUFFIX
            previous = self.offsets.get(key, torch.zeros_like(residual, dtype=torch.float32)).double()
            self.offsets[key] = (previous + residual).float()
            squares += float(residual.square().sum())
        self.last_residual_norm = squares**0.5
        return out

    def base_offset(self) -> AdapterState:
        return self.offsets

    def round_metrics(self) -> dict[str, float]:
        return {"residual_norm": self.last_residual_norm}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.offsets)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.offsets = {k: v.to(torch.float32).clone() for k, v in state.items()}
