"""DARE merging of client updates (random drop and rescale), with PEFT's implementation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from strategies.base import AdapterState, AggregationRule, ClientUpdate, client_deltas, example_weights


class DareMerge(AggregationRule):
    """DARE: drop each update entry with probability ``1 - density``, rescale the rest by 1/density.

    The example-weighted sum of the sparsified updates is an unbiased estimate of the
    linear average's update, with variance that grows as density falls. Yu et al. 2024,
    Language Models are Super Mario, https://arxiv.org/abs/2311.03099. The arithmetic is
    PEFT's ``merge_utils.dare_linear`` (or ``dare_ties`` with ``ties = true``).

    PEFT draws the drop masks from torch's global RNG; this rule seeds a forked RNG per
    round from ``seed``, so runs are reproducible and the server's other random draws are
    untouched.

    Parameters
    ----------
    density : float
        Fraction of entries kept, in (0, 1].
    ties : bool
        Follow the random drop with TIES's sign election (PEFT's ``dare_ties``).
    seed : int
        Seed of the drop masks (mixed with the round number).
    """

    name = "dare"

    def __init__(self, density: float = 0.5, ties: bool = False, seed: int = 0) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        self.density = density
        self.ties = ties
        self.seed = seed
        self._round = 0

    def aggregate(self, updates: Sequence[ClientUpdate], current: Mapping[str, torch.Tensor]) -> AdapterState:
        from peft.utils import merge_utils  # here: importing PEFT loads transformers (seconds)

        weights = torch.tensor(example_weights(updates, self.name))
        self._round += 1
        out: AdapterState = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + self._round)
            for key, reference in current.items():
                deltas = list(client_deltas(updates, current, key))
                if self.ties:
                    merged = merge_utils.dare_ties(deltas, weights * len(updates), self.density)
                else:
                    merged = merge_utils.dare_linear(deltas, weights, self.density)
                out[key] = (reference.to(torch.float32) + merged).to(reference.dtype)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"round": torch.tensor(self._round, dtype=torch.int64)}  # the masks' seed depends on it

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._round = int(state["round"])
