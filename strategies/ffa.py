"""FFA-LoRA: A frozen at its shared initialisation, only B trained and averaged."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from copra_core.adapters import LORA_A
from strategies.base import AdapterState, ClientUpdate, StrategyContractError
from strategies.linear import LinearAveraging


class FrozenAAveraging(LinearAveraging):
    """Average B (and the head) while every client keeps the same, frozen A.

    With a common A, ``sum_k w_k B_k A = (sum_k w_k B_k) A``: factor averaging is exact
    in product space (exactness error 0) at the price of training half the LoRA
    parameters. Sun et al. 2024, Improving LoRA in Privacy-preserving Federated
    Learning, https://arxiv.org/abs/2403.12313.

    Sets ``lora.freeze-a = true`` on every client; a client whose A differs from the
    global A (a client that ignored the setting) is an error naming the client, because
    averaging it would silently lose exactness.
    """

    name = "ffa"
    single_pass = False  # checks every client's A before averaging: two passes
    client_overrides: ClassVar[Mapping[str, bool | int | float | str]] = {"lora.freeze-a": True}

    def aggregate(self, updates: Sequence[ClientUpdate], current: Mapping[str, torch.Tensor]) -> AdapterState:
        for update in updates:
            for key in current:
                if key.endswith(LORA_A) and not torch.equal(update.state[key], current[key]):
                    raise StrategyContractError(
                        f"ffa: client node {update.node_id} changed the frozen '{key}' "
                        "(clients must run with lora.freeze-a = true)"
                    )
        out = super().aggregate(updates, current)
        for key in current:
            if key.endswith(LORA_A):
                out[key] = current[key].clone()  # bit-exact: no rounding from the weighted sum
        return out
