"""Turn proxy scores into an allocation that fits the budget exactly."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from copra_core.adapters import LORA_A, LORA_B, lora_modules
from copra_core.config import ConfigError


@dataclass(frozen=True)
class Allocation:
    """The server's decision for one allocation period.

    ``ranking`` holds every candidate, best score first (ties in a seeded random order, so
    the constant proxy is a uniformly random allocation); ``modules`` the enabled ones.
    A client with its own budget takes a prefix of ``ranking`` instead (``masking.py``).
    """

    modules: tuple[str, ...]
    ranking: tuple[str, ...]
    params: int
    scores: Mapping[str, float]


def module_costs(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Trainable parameters of every LoRA module at its rank: ``r * (d_in + d_out)``."""
    return {m: state[m + LORA_A].numel() + state[m + LORA_B].numel() for m in lora_modules(state)}


def allocate(
    scores: Mapping[str, float],
    costs: Mapping[str, int],
    *,
    budget: float,
    budget_params: int = 0,
    seed: int = 0,
) -> Allocation:
    """Enable the best-scoring candidates within the budget.

    Parameters
    ----------
    scores : Mapping[str, float]
        Proxy score per candidate module (higher = more useful).
    costs : Mapping[str, int]
        Trainable parameters of each candidate at the full rank.
    budget : float
        Fraction of candidates enabled, in (0, 1]: ``floor(budget * N)`` modules (at least
        one), so the fraction is never exceeded.
    budget_params : int
        If > 0, a parameter count instead: modules are taken in ranking order, skipping any
        that no longer fits, so the total never exceeds it.
    seed : int
        Breaks ties between equal scores.
    """
    if set(scores) != set(costs):
        raise ValueError(f"scores and costs name different modules: {sorted(set(scores) ^ set(costs))[:3]}")
    if not scores:
        raise ConfigError("Config key 'allocation.enabled': the adapter has no LoRA modules to allocate.")
    if not 0 < budget <= 1:
        raise ConfigError(f"Config key 'allocation.budget' must be in (0, 1], got {budget}.")
    if budget_params < 0:
        raise ConfigError(f"Config key 'allocation.budget-params' must be >= 0, got {budget_params}.")
    bad = sorted(m for m, s in scores.items() if not math.isfinite(s))
    if bad:
        raise ValueError(f"non-finite proxy scores for {bad[:3]}")
    order = sorted(scores)
    random.Random(seed).shuffle(order)  # tie-break: a seeded permutation, then a stable sort
    ranking = tuple(sorted(order, key=lambda m: -scores[m]))
    if budget_params:
        if budget_params < min(costs.values()):
            raise ConfigError(
                f"Config key 'allocation.budget-params'={budget_params} is smaller than the cheapest module "
                f"({min(costs.values())} parameters)."
            )
        chosen, used = [], 0
        for module in ranking:
            if used + costs[module] <= budget_params:
                chosen.append(module)
                used += costs[module]
    else:
        count = max(1, math.floor(budget * len(ranking) + 1e-9))
        chosen = list(ranking[:count])
    return Allocation(
        modules=tuple(chosen),
        ranking=ranking,
        params=sum(costs[m] for m in chosen),
        scores=dict(scores),
    )


def weighted_scores(replies: list[tuple[Mapping[str, float], int]]) -> dict[str, float]:
    """Example-weighted mean of the clients' score maps (every client scores every module)."""
    total = sum(n for _, n in replies)
    if total <= 0:
        raise ValueError("proxy scores: the replies' num-examples sum to zero")
    modules = set(replies[0][0])
    for scores, _ in replies:
        if set(scores) != modules:
            raise ValueError(f"proxy scores name different modules: {sorted(set(scores) ^ modules)[:3]}")
    return {m: sum(scores[m] * n for scores, n in replies) / total for m in sorted(modules)}
