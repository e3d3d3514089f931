"""Diagnostics where the data lives: each client against the aggregate, on its own rows.

The server-side diagnostics (``copra_core/diagnostics.py``) need the server to hold data.
Here each client measures instead, on its own validation examples, after aggregation
(docs/methods.md#client-side-diagnostics). Client ``k`` keeps the adapter ``theta_k`` it
trained in round ``t`` in its node state; the evaluate message of round ``t`` brings the
aggregate ``theta_bar``; the client reports

* ``local/loss_own`` = ``L_k(theta_k)`` and ``local/loss_global`` = ``L_k(theta_bar)``
  (and the task metric of both);
* ``local/curve_<i>`` = ``L_k(theta(alpha_i))`` on the straight line
  ``theta(alpha) = (1 - alpha) theta_k + alpha theta_bar`` (factor space, as the server's
  pairwise barrier) for every point ``alpha_i`` of ``diagnostics.grid``.

Only these numbers leave the node; no client ever sees another client's adapter. The
server reduces them (``reduce_local``) to the **local Jensen gap**
``sum_k w_k [L_k(theta_bar) - L_k(theta_k)]`` and the **client-to-global barrier**
``max_k max_alpha L_k(theta(alpha)) - ((1 - alpha) L_k(theta_k) + alpha L_k(theta_bar))``.

A rule that moved the base this round (``residual``, ``flora``) has ``theta_k`` on the base
the client trained on and ``theta_bar`` on the new one: the line then runs between the two
whole models, the base offsets interpolated with the adapter (offsets are linear in
the weights, so ``alpha = 0`` and ``1`` are exactly the two models).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, RecordDict

from copra_core.adapters import LORA_A, LORA_B, AdapterState, from_array_record, to_array_record
from copra_core.diagnostics import _barrier, interpolate, normalised_weights

#: Prefix of every client-side diagnostic in an evaluate reply and in metrics.jsonl.
PREFIX = "local/"
LOSS_OWN = "local/loss_own"
LOSS_GLOBAL = "local/loss_global"
METRIC_OWN = "local/metric_own"
METRIC_GLOBAL = "local/metric_global"
#: The client's training example count: its weight ``w_k``, as in the aggregation.
WEIGHT = "local/weight"
#: The client's partition id (-1 where a node has none), for the per-client rows.
PARTITION = "local/partition-id"
#: ``local/curve_<i>``: the loss at the i-th point of ``diagnostics.grid``.
CURVE = "local/curve_{}"

#: Keys in the node state (``Context.state``) of what a client keeps between its train and evaluate replies.
STATE_ADAPTER = "local-diagnostics.adapter"
STATE_OFFSETS = "local-diagnostics.offsets"
STATE_META = "local-diagnostics.meta"

#: Evaluates an adapter on the base offset by the given offsets; returns ``loss`` and the task metric.
Evaluate = Callable[[AdapterState, Mapping[str, torch.Tensor]], dict[str, float]]


# ---------------------------------------------------------------------- client: what it keeps
@dataclass
class TrainedAdapter:
    """The adapter a client trained in ``server_round`` of run ``run``, as the server received it, and its
    base offsets. ``run`` (the config's fingerprint) tells the runs of a sweep apart: they share the nodes,
    hence the node state, and number their rounds alike."""

    server_round: int
    state: AdapterState
    offsets: AdapterState
    weight: float
    run: str = ""


def keep(node_state: RecordDict, trained: TrainedAdapter) -> None:
    """Store ``trained`` in the node state, replacing whatever an earlier round kept (one adapter per node)."""
    node_state[STATE_ADAPTER] = to_array_record(trained.state, "float32")
    node_state[STATE_OFFSETS] = to_array_record(trained.offsets, "float32")
    meta = {"server-round": trained.server_round, "weight": trained.weight, "run": trained.run}
    node_state[STATE_META] = ConfigRecord(meta)  # type: ignore[arg-type]


def take(node_state: RecordDict, server_round: int, run: str = "") -> TrainedAdapter | None:
    """The adapter trained in ``server_round`` of ``run``, removed from the node state; None if this node did
    not train then.

    Whatever is kept is removed: a stale adapter (an earlier round's) is never compared with a later aggregate.
    """
    if STATE_META not in node_state:
        return None
    meta = node_state.pop(STATE_META)
    adapter, offsets = node_state.pop(STATE_ADAPTER), node_state.pop(STATE_OFFSETS)
    if int(meta["server-round"]) != server_round or str(meta["run"]) != run:  # type: ignore[index]
        return None
    return TrainedAdapter(
        server_round,
        from_array_record(adapter),  # type: ignore[arg-type]
        from_array_record(offsets),  # type: ignore[arg-type]
        float(meta["weight"]),  # type: ignore[index]
        run,
    )


# ---------------------------------------------------------------------- client: the measurement
def padded_like(state: AdapterState, like: AdapterState) -> AdapterState:
    """``state`` with LoRA factors of a lower rank zero-padded to ``like``'s (the same function: the extra
    rank components contribute ``0 @ 0``); mixed-rank allocation keeps truncated adapters."""
    out = {}
    for key, value in state.items():
        target = like[key]
        if value.shape == target.shape or not key.endswith((LORA_A, LORA_B)):
            out[key] = value
            continue
        padded = torch.zeros_like(target)
        padded[tuple(slice(0, n) for n in value.shape)] = value
        out[key] = padded
    return out


def interpolate_offsets(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float) -> AdapterState:
    """``alpha * a + (1 - alpha) * b`` over the union of keys (a missing offset is zero)."""
    keys = sorted(set(a) | set(b))
    return {
        k: alpha * a[k] + (1 - alpha) * b[k] if k in a and k in b else (alpha * a[k] if k in a else (1 - alpha) * b[k])
        for k in keys
    }


def same_offsets(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def measure_client(
    evaluate: Evaluate,
    trained: TrainedAdapter,
    aggregate: AdapterState,
    aggregate_offsets: Mapping[str, torch.Tensor],
    grid: Sequence[float],
    metric: str,
) -> dict[str, float]:
    """This client's ``local/*`` figures: its own adapter, the aggregate, and the line between them.

    Cost: 2 evaluations plus one per interior grid point, on the client's validation rows.
    """
    own = padded_like(trained.state, aggregate)
    own_res = evaluate(own, trained.offsets)
    global_res = evaluate(aggregate, aggregate_offsets)
    moved = not same_offsets(trained.offsets, aggregate_offsets)
    out = {
        LOSS_OWN: own_res["loss"],
        LOSS_GLOBAL: global_res["loss"],
        METRIC_OWN: own_res[metric],
        METRIC_GLOBAL: global_res[metric],
        WEIGHT: trained.weight,
    }
    for i, alpha in enumerate(grid):
        if alpha in (0.0, 1.0):  # the endpoints are the two adapters themselves
            loss = global_res["loss"] if alpha == 1.0 else own_res["loss"]
        else:
            offsets = interpolate_offsets(aggregate_offsets, trained.offsets, alpha) if moved else aggregate_offsets
            loss = evaluate(interpolate(aggregate, own, alpha), offsets)["loss"]
        out[CURVE.format(i)] = loss
    return out


# ---------------------------------------------------------------------- server: the reduction
def split_local(metrics: Mapping[str, object]) -> tuple[dict[str, object], dict[str, float]]:
    """(the reply's other metrics, its ``local/*`` figures)."""
    local = {k: float(v) for k, v in metrics.items() if k.startswith(PREFIX)}  # type: ignore[arg-type]
    return {k: v for k, v in metrics.items() if not k.startswith(PREFIX)}, local


def client_barrier(local: Mapping[str, float], grid: Sequence[float]) -> float:
    """max over the interior grid points of ``L_k(theta(alpha)) - ((1 - alpha) L_k(theta_k) + alpha L_k(theta_bar))``.

    Interior only: at ``alpha = 0`` and ``1`` the bump is 0 by definition, so a negative value
    says the whole line lies below the chord. NaN when the grid has no interior point.
    """
    interior = [(i, a) for i, a in enumerate(grid) if 0.0 < a < 1.0]
    if not interior:
        return math.nan
    curve = [local[CURVE.format(i)] for i, _ in interior]
    return _barrier(curve, [a for _, a in interior], local[LOSS_GLOBAL], local[LOSS_OWN])


def reduce_local(
    reports: Sequence[tuple[int, Mapping[str, float]]], grid: Sequence[float], metric: str
) -> tuple[dict[str, float], list[dict]]:
    """The round's ``local/*`` metrics and per-client rows from ``(partition id, local figures)`` pairs.

    ``local/jensen_gap``: ``sum_k w_k [L_k(theta_bar) - L_k(theta_k)]`` with ``w_k`` the
    clients' training example counts, normalised over the reporting clients;
    ``local/barrier_max`` (``_mean``): max (mean) over the clients of the client-to-global
    barrier, the largest bump above the chord ``(1 - alpha) L_k(theta_k) + alpha L_k(theta_bar)``
    at the interior grid points (absent when the grid has none).
    """
    if not reports:
        return {}, []
    figures = [local for _, local in reports]
    weights = normalised_weights([f[WEIGHT] for f in figures])
    barriers = [client_barrier(f, grid) for f in figures]
    own = sum(w * f[LOSS_OWN] for w, f in zip(weights, figures, strict=True))
    glob = sum(w * f[LOSS_GLOBAL] for w, f in zip(weights, figures, strict=True))
    metrics = {
        "local/clients": float(len(reports)),
        "local/mean_loss_own": own,
        "local/mean_loss_global": glob,
        "local/jensen_gap": glob - own,
        f"local/mean_{metric}_own": sum(w * f[METRIC_OWN] for w, f in zip(weights, figures, strict=True)),
        f"local/mean_{metric}_global": sum(w * f[METRIC_GLOBAL] for w, f in zip(weights, figures, strict=True)),
    }
    if not any(math.isnan(b) for b in barriers):
        metrics["local/barrier_max"] = max(barriers)
        metrics["local/barrier_mean"] = sum(barriers) / len(barriers)
    rows = [
        {
            "partition-id": partition,
            "weight": f[WEIGHT],
            "loss_own": f[LOSS_OWN],
            "loss_global": f[LOSS_GLOBAL],
            f"{metric}_own": f[METRIC_OWN],
            f"{metric}_global": f[METRIC_GLOBAL],
            "barrier": barrier,
            "alphas": list(grid),
            "curve": [f[CURVE.format(i)] for i in range(len(grid))],
        }
        for (partition, _), f, barrier in zip(reports, figures, barriers, strict=True)
    ]
    return metrics, rows
