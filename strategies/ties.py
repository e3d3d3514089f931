"""TIES merging of client updates (trim, elect sign, disjoint merge), with PEFT's implementation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from strategies.base import AdapterState, AggregationRule, ClientUpdate, client_deltas, example_weights


class TiesMerge(AggregationRule):
    """TIES-Merging of the clients' updates (task vectors) onto the global adapter.

    Each client's update ``theta_k - theta`` keeps its top-``density`` entries by
    magnitude; per entry the sign with the larger total mass is elected; entries that
    disagree with it are dropped and the rest are averaged. Yadav et al. 2023,
    https://arxiv.org/abs/2306.01708. The arithmetic is PEFT's ``merge_utils.ties``.

    PEFT's weights are per-task scales (1 = as is) and its disjoint merge divides by the
    number of agreeing tasks, so the example weights are passed as ``K * w_k``: equal
    clients then get the plain mean of their agreeing entries.

    Parameters
    ----------
    density : float
        Fraction of each update's entries kept, in (0, 1].
    majority_sign : str
        ``total`` (sign of the summed values) or ``frequency`` (sign of the most clients).
    """

    name = "ties"

    def __init__(self, density: float = 0.5, majority_sign: str = "total") -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if majority_sign not in ("total", "frequency"):
            raise ValueError(f"majority-sign must be 'total' or 'frequency', got '{majority_sign}'")
        self.density = density
        self.majority_sign = majority_sign

    def aggregate(self, updates: Sequence[ClientUpdate], current: Mapping[str, torch.Tensor]) -> AdapterState:
        from peft.utils import merge_utils  # here: importing PEFT loads transformers (seconds)

        weights = torch.tensor(example_weights(updates, self.name)) * len(updates)
        out: AdapterState = {}
        for key, reference in current.items():
            deltas = list(client_deltas(updates, current, key))
            merged = merge_utils.ties(deltas, weights, self.density, self.majority_sign)
            out[key] = (reference.to(torch.float32) + merged).to(reference.dtype)
        return out
