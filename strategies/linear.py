"""Linear averaging of LoRA factors (FedIT / FedAvg on adapters)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from strategies.base import AdapterState, AggregationRule, ClientUpdate


class LinearAveraging(AggregationRule):
    """Example-weighted average of every adapter tensor: LoRA A, LoRA B and saved modules.

    ``A_new = sum_k w_k A_k`` and ``B_new = sum_k w_k B_k`` with ``w_k = n_k / sum_j n_j``.
    This is what FedAvg does to an adapter (FedIT, Zhang et al. 2024,
    https://arxiv.org/abs/2305.05644). It is exact for the task head but only
    approximates the average update in product space, ``sum_k w_k B_k A_k``; the gap is
    reported every round as ``aggregation/exactness_error``, and whether averaging is
    safe at all as the barrier diagnostics.
    """

    name = "linear"

    def aggregate(self, updates: Sequence[ClientUpdate], current: Mapping[str, torch.Tensor]) -> AdapterState:
        total = sum(u.num_examples for u in updates)
        if total <= 0:
            raise ValueError("linear: the updates' num-examples sum to zero")
        out: AdapterState = {}
        for key, reference in current.items():
            # Streaming sum: one accumulator per tensor, whatever the number of clients.
            acc = torch.zeros_like(reference, dtype=torch.float32)
            for update in updates:
                acc.add_(update.state[key].to(torch.float32), alpha=update.num_examples / total)
            out[key] = acc.to(reference.dtype)
        return out
