"""Geometric median of the client adapters (robust aggregation), as a user would write it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from strategies.base import AdapterState, AggregationRule, ClientUpdate, example_weights


class GeometricMedian(AggregationRule):
    """The point minimising the weighted sum of distances to the client adapters.

    Computed by smoothed Weiszfeld iterations over the flattened adapters, starting from
    the weighted mean (Pillutla et al. 2022, Robust Aggregation for Federated Learning,
    https://arxiv.org/abs/1912.13445). Unlike the coordinate-wise median it is a point of
    the clients' span, and one client far away moves it by a bounded amount.

    Parameters
    ----------
    iterations : int
        Weiszfeld steps (the paper finds 3-4 enough).
    eps : float
        Smoothing: distances below eps count as eps (no division by zero).
    """

    name = "geometric_median"

    def __init__(self, iterations: int = 4, eps: float = 1e-6) -> None:
        if iterations < 1 or eps <= 0:
            raise ValueError("need iterations >= 1 and eps > 0")
        self.iterations = iterations
        self.eps = eps
        self.last_distance_ratio = 0.0

    def aggregate(self, updates: Sequence[ClientUpdate], current: Mapping[str, torch.Tensor]) -> AdapterState:
        keys = list(current)
        points = torch.stack([torch.cat([u.state[k].double().flatten() for k in keys]) for u in updates])
        weights = torch.tensor(example_weights(updates, self.name), dtype=torch.float64)
        median = weights @ points
        for _ in range(self.iterations):
            distances = torch.linalg.vector_norm(points - median, dim=1).clamp_min(self.eps)
            beta = weights / distances
            median = (beta / beta.sum()) @ points
        distances = torch.linalg.vector_norm(points - median, dim=1)
        self.last_distance_ratio = float(distances.max() / distances.median().clamp_min(self.eps))
        out: AdapterState = {}
        offset = 0
        for key in keys:
            size = current[key].numel()
            out[key] = median[offset : offset + size].reshape(current[key].shape).to(current[key].dtype)
            offset += size
        return out

    def round_metrics(self) -> dict[str, float]:
        # How far the farthest client is, relative to the typical one: a flag for outliers.
        return {"max_over_median_distance": self.last_distance_ratio}
