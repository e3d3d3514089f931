"""Linear-mode-connectivity diagnostics for federated LoRA (docs/methods.md#diagnostics).

Averaging adapters is only as good as the loss along the straight line between them.
For client adapters theta_k with example weights w_k (sum 1), measured every round on a
fixed server evaluation sample:

* K-client Jensen gap ``J = L(sum_k w_k theta_k) - sum_k w_k L(theta_k)`` in factor space
  (A and B averaged separately, what FedAvg does) and in product space
  (``Delta W = sum_k w_k B_k A_k``, the exact average of the updates);
* pairwise interpolation barrier
  ``max_alpha L(alpha theta_i + (1-alpha) theta_j) - (alpha L(theta_i) + (1-alpha) L(theta_j))``
  (Entezari et al. 2022, https://arxiv.org/abs/2110.06296) on a grid, in both spaces,
  plus the error-barrier variant (Frankle et al. 2020, https://arxiv.org/abs/1912.05671);
* aggregation-exactness error of factor averaging
  ``||sum w_k B_k A_k - (sum w_k B_k)(sum w_k A_k)||_F / ||sum w_k B_k A_k||_F``, and the
  same error for the adapter the strategy actually produced (``aggregate_error``:
  ``B_agg A_agg`` in place of the factor average), so every rule is measured alike.

Non-LoRA weights (the task head) are linear in both spaces and are averaged alike.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from copra_core.adapters import LORA_A, LORA_B, AdapterState, dense_keys, lora_modules
from copra_core.lowrank import weighted_product_sum

Deltas = dict[str, torch.Tensor]


class AdapterEvaluator(Protocol):
    """Evaluates adapters on the fixed diagnostic sample; returns 'loss' and the task metric."""

    metric: str

    def factor(self, state: AdapterState) -> dict[str, float]: ...

    def product(self, deltas: Deltas, dense: AdapterState) -> dict[str, float]: ...


# ---------------------------------------------------------------------- tensor maths
def normalised_weights(num_examples: Sequence[float]) -> list[float]:
    total = float(sum(num_examples))
    if total <= 0:
        raise ValueError("num-examples must sum to a positive number")
    return [float(n) / total for n in num_examples]


def weighted_average(states: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """Example-weighted average of every tensor (factor space), accumulated in fp32."""
    keys = states[0].keys()
    return {key: sum(w * s[key].to(torch.float32) for w, s in zip(weights, states, strict=True)) for key in keys}


def interpolate(a: AdapterState, b: AdapterState, alpha: float) -> AdapterState:
    """alpha * a + (1 - alpha) * b, tensor by tensor."""
    return {key: alpha * a[key] + (1.0 - alpha) * b[key] for key in a}


def product_deltas(state: AdapterState) -> Deltas:
    """Unscaled LoRA products B @ A per module (d_out x d_in)."""
    return {m: state[m + LORA_B] @ state[m + LORA_A] for m in lora_modules(state)}


def average_products(states: Sequence[AdapterState], weights: Sequence[float]) -> Deltas:
    """``sum_k w_k B_k A_k`` per module, dense (the evaluator needs the matrix).

    In the factors' own precision (fp32), as the diagnostics always measured it; the
    products are formed one client at a time, never all K at once.
    """
    return {
        m: weighted_product_sum(((s[m + LORA_B], s[m + LORA_A]) for s in states), weights, dtype=None)
        for m in lora_modules(states[0])
    }


def dense_part(state: AdapterState) -> AdapterState:
    return {k: state[k] for k in dense_keys(state)}


def exactness_error(states: Sequence[AdapterState], weights: Sequence[float]) -> float:
    """Relative Frobenius error of factor averaging against the exact product average.

    Pooled over all LoRA modules: sqrt(sum_m ||E_m||^2) / sqrt(sum_m ||P_m||^2).
    """
    return aggregate_error(states, weights, weighted_average(states, weights))


def aggregate_error(
    states: Sequence[AdapterState],
    weights: Sequence[float],
    aggregate: AdapterState,
    offset_change: Deltas | None = None,
    exact: Deltas | None = None,
) -> float:
    """Relative Frobenius distance of ``aggregate``'s products from the exact product average.

    ``offset_change``: what the rule added to the frozen base this round (per module, in
    ``B A`` units), which is part of the aggregate's update. ``exact``: the target when it
    is not the plain weighted average of ``states`` (masked adapters: each module's average
    over the clients that trained it).
    """
    if exact is None:
        exact = average_products(states, weights)
    num = den = 0.0
    for module, target in exact.items():
        approx = aggregate[module + LORA_B] @ aggregate[module + LORA_A]
        if offset_change and module in offset_change:
            approx = approx + offset_change[module]
        num += float(torch.linalg.matrix_norm(target - approx) ** 2)
        den += float(torch.linalg.matrix_norm(target) ** 2)
    return math.sqrt(num / den) if den > 0 else 0.0


# ---------------------------------------------------------------------- round diagnostics
@dataclass
class MaskedAverages:
    """Averages of partial client adapters (HeteroLoRA allocation, mixed ranks).

    Each module is averaged over the clients that trained it (``copra_core/allocation/merge.py``):
    ``factor`` component-wise in factor space, ``product`` exactly in product space (with
    ``dense`` the head's average). They replace the plain weighted averages, whose
    zero-filled modules would be meaningless.
    """

    factor: AdapterState
    product: Deltas
    dense: AdapterState


@dataclass
class InterpolationCurve:
    pair: tuple[int, int]
    alphas: list[float]
    loss_factor: list[float]
    loss_product: list[float]
    metric_factor: list[float]


def _barrier(curve: Sequence[float], alphas: Sequence[float], end_i: float, end_j: float) -> float:
    """max over alpha of curve(alpha) - (alpha * end_i + (1 - alpha) * end_j)."""
    return max(value - (a * end_i + (1 - a) * end_j) for value, a in zip(curve, alphas, strict=True))


def choose_pairs(num_clients: int, num_pairs: int, seed: int) -> list[tuple[int, int]]:
    """Deterministic sample of distinct client pairs (indices)."""
    pairs = list(itertools.combinations(range(num_clients), 2))
    random.Random(seed).shuffle(pairs)
    return sorted(pairs[:num_pairs])


def round_diagnostics(
    states: Sequence[AdapterState],
    num_examples: Sequence[float],
    aggregate: AdapterState,
    evaluator: AdapterEvaluator,
    *,
    grid: Sequence[float],
    num_pairs: int,
    seed: int,
    offset_change: Deltas | None = None,
    masked: MaskedAverages | None = None,
) -> tuple[dict[str, float], list[dict[str, float]], list[InterpolationCurve]]:
    """All per-round diagnostics; returns (flat metrics, per-client results, curves).

    Everything is measured on the base the clients trained on. A rule that also moved the
    base (``offset_change``) has its aggregate evaluated in product space as
    ``B_agg A_agg + offset_change``, which is what the next round's base plus adapter computes.

    ``masked``: the clients trained different modules or ranks; ``states`` are then the
    whole adapters their models held (``allocation.masking.effective_state``) and the
    averages are the masked ones.

    Cost: K + 3 evaluations, plus 2 per interior grid point per pair.
    """
    metric = evaluator.metric
    weights = normalised_weights(num_examples)
    clients = [evaluator.factor(s) for s in states]
    mean_loss = sum(w * c["loss"] for w, c in zip(weights, clients, strict=True))
    mean_metric = sum(w * c[metric] for w, c in zip(weights, clients, strict=True))

    factor_avg = masked.factor if masked else weighted_average(states, weights)
    factor_res = evaluator.factor(factor_avg)
    dense = [dense_part(s) for s in states]
    exact = masked.product if masked else average_products(states, weights)
    if offset_change:
        moved = {m: d + offset_change[m] if m in offset_change else d for m, d in product_deltas(aggregate).items()}
        aggregate_res = evaluator.product(moved, dense_part(aggregate))
    elif all(torch.equal(factor_avg[k], aggregate[k]) for k in factor_avg):
        aggregate_res = factor_res  # the rule is linear averaging: no second evaluation
    else:
        aggregate_res = evaluator.factor(aggregate)
    product_res = evaluator.product(exact, masked.dense if masked else weighted_average(dense, weights))

    metrics: dict[str, float] = {
        "clients/mean_loss": mean_loss,
        f"clients/mean_{metric}": mean_metric,
        f"diag/aggregate_{metric}": aggregate_res[metric],
        f"diag/factor_avg_{metric}": factor_res[metric],
        f"diag/product_avg_{metric}": product_res[metric],
        "barrier/jensen_factor": factor_res["loss"] - mean_loss,
        "barrier/jensen_product": product_res["loss"] - mean_loss,
        "barrier/jensen_aggregate": aggregate_res["loss"] - mean_loss,
        "barrier/merge_deficit": mean_metric - aggregate_res[metric],
        "aggregation/exactness_error": aggregate_error(states, weights, factor_avg, exact=exact),
        "aggregation/aggregate_error": aggregate_error(states, weights, aggregate, offset_change, exact=exact),
    }

    curves: list[InterpolationCurve] = []
    for i, j in choose_pairs(len(states), num_pairs, seed):
        curve = InterpolationCurve((i, j), list(grid), [], [], [])
        for alpha in grid:
            if alpha in (0.0, 1.0):  # endpoints are the clients themselves
                end = clients[i] if alpha == 1.0 else clients[j]
                curve.loss_factor.append(end["loss"])
                curve.loss_product.append(end["loss"])
                curve.metric_factor.append(end[metric])
                continue
            f_res = evaluator.factor(interpolate(states[i], states[j], alpha))
            p_res = evaluator.product(
                average_products([states[i], states[j]], [alpha, 1 - alpha]),
                interpolate(dense[i], dense[j], alpha),
            )
            curve.loss_factor.append(f_res["loss"])
            curve.loss_product.append(p_res["loss"])
            curve.metric_factor.append(f_res[metric])
        curves.append(curve)

    if curves:
        factor_barriers, product_barriers, error_barriers = [], [], []
        for c in curves:
            i, j = c.pair
            li, lj = clients[i]["loss"], clients[j]["loss"]
            factor_barriers.append(_barrier(c.loss_factor, c.alphas, li, lj))
            product_barriers.append(_barrier(c.loss_product, c.alphas, li, lj))
            errors = [1.0 - m for m in c.metric_factor]
            error_barriers.append(_barrier(errors, c.alphas, 1 - clients[i][metric], 1 - clients[j][metric]))
        metrics["barrier/pairwise_max"] = max(factor_barriers)
        metrics["barrier/pairwise_mean"] = sum(factor_barriers) / len(factor_barriers)
        metrics["barrier/pairwise_max_product"] = max(product_barriers)
        metrics["barrier/pairwise_error_max"] = max(error_barriers)
    return metrics, clients, curves
