"""Coordinate-wise trimmed mean of the client adapters."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from strategies.base import AdapterState, AggregationRule, ClientUpdate


class TrimmedMean(AggregationRule):
    """Per entry, drop the ``trim_fraction`` largest and smallest client values, average the rest.

    ``floor(trim_fraction * K)`` values are cut from each end (never all of them: at
    least one value remains). Unweighted, like the median. Yin et al. 2018,
    https://arxiv.org/abs/1803.01498.

    Parameters
    ----------
    trim_fraction : float
        Fraction of clients cut from each end, in [0, 0.5).
    """

    name = "trimmed_mean"

    def __init__(self, trim_fraction: float = 0.2) -> None:
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim-fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction
        self.last_trimmed = 0

    def aggregate(self, updates: Sequence[ClientUpdate], current: Mapping[str, torch.Tensor]) -> AdapterState:
        num = len(updates)
        cut = min(math.floor(self.trim_fraction * num), (num - 1) // 2)
        self.last_trimmed = cut
        out: AdapterState = {}
        for key, reference in current.items():
            stacked = torch.stack([u.state[key].to(torch.float32) for u in updates])
            ordered, _ = torch.sort(stacked, dim=0)
            out[key] = ordered[cut : num - cut].mean(dim=0).to(reference.dtype)
        return out

    def round_metrics(self) -> dict[str, float]:
        return {"trimmed_per_side": float(self.last_trimmed)}
