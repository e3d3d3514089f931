"""Norm-clipped averaging of client updates."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import torch

from strategies.base import AdapterState, AggregationRule, ClientUpdate, example_weights


class NormClipAveraging(AggregationRule):
    """Clip each client's update to an L2 norm bound, then average the clipped updates.

    A client's update is its adapter minus the global adapter it started from,
    flattened over all tensors; ``u_k <- u_k * min(1, c / ||u_k||)`` and the new global
    adapter is ``theta + sum_k w_k u_k``. Bounds what any one client can move the model
    (Sun et al. 2019, Can You Really Backdoor Federated Learning?,
    https://arxiv.org/abs/1911.07963).

    Parameters
    ----------
    max_norm : float
        The bound ``c``; 0 = the median of this round's update norms (adaptive, no tuning).
    """

    name = "norm_clip"

    def __init__(self, max_norm: float = 0.0) -> None:
        if max_norm < 0:
            raise ValueError(f"max-norm must be >= 0, got {max_norm}")
        self.max_norm = max_norm
        self.last: dict[str, float] = {}

    def aggregate(self, updates: Sequence[ClientUpdate], current: Mapping[str, torch.Tensor]) -> AdapterState:
        weights = example_weights(updates, self.name)
        norms = [
            sum(float((u.state[k].double() - current[k].double()).square().sum()) for k in current) ** 0.5
            for u in updates
        ]
        bound = self.max_norm or statistics.median(norms)
        scales = [min(1.0, bound / n) if n > 0 else 1.0 for n in norms]
        out: AdapterState = {}
        for key, reference in current.items():
            acc = reference.to(torch.float32).clone()
            for w, s, update in zip(weights, scales, updates, strict=True):
                acc.add_(update.state[key].to(torch.float32) - reference, alpha=w * s)
            out[key] = acc.to(reference.dtype)
        self.last = {
            "clip_bound": bound,
            "clipped_clients": float(sum(s < 1.0 for s in scales)),
            "update_norm_max": max(norms),
        }
        return out

    def round_metrics(self) -> dict[str, float]:
        return dict(self.last)
