"""Coordinate-wise median of the client adapters (robust to a minority of bad clients)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from strategies.base import AdapterState, AggregationRule, ClientUpdate


class CoordinateMedian(AggregationRule):
    """Every entry of every adapter tensor is the median over the clients.

    Unweighted by design: weighting by example counts would let one client that claims
    many examples pick the result, which is what a robust rule must prevent. With an even
    number of clients the mean of the two middle values is used (numpy's convention, as
    in Flower's FedMedian). Yin et al. 2018, Byzantine-Robust Distributed Learning,
    https://arxiv.org/abs/1803.01498.

    Applied in factor space: the median of A's and of B's is not the median of the
    products, so the exactness error of this rule is usually larger than linear's.
    """

    name = "median"

    def aggregate(self, updates: Sequence[ClientUpdate], current: Mapping[str, torch.Tensor]) -> AdapterState:
        out: AdapterState = {}
        for key, reference in current.items():
            # One tensor at a time: memory K x (largest tensor), not K x adapter.
            stacked = torch.stack([u.state[key].to(torch.float32) for u in updates])
            out[key] = torch.quantile(stacked.flatten(1), 0.5, dim=0).reshape(reference.shape).to(reference.dtype)
        return out
