"""Linear averaging of LoRA factors (FedIT / FedAvg on adapters)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
    single_pass = True

    def aggregate(self, updates: Iterable[ClientUpdate], current: Mapping[str, torch.Tensor]) -> AdapterState:
        """One pass over ``updates``: any iterable works, including a generator that
        decodes client replies one at a time, so memory is one accumulator per tensor
        whatever the number of clients (``benchmarks/aggregation.py`` measures it)."""
        sums = {key: torch.zeros_like(reference, dtype=torch.float32) for key, reference in current.items()}
        total = 0
        for update in updates:
            for key, acc in sums.items():
                acc.add_(update.state[key].to(torch.float32), alpha=float(update.num_examples))
            total += update.num_examples
        if total <= 0:
            raise ValueError(f"{self.name}: the updates' num-examples sum to zero")
        return {key: acc.div_(total).to(current[key].dtype) for key, acc in sums.items()}
