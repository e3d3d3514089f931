"""The barrier diagnostics of one round: on the server's diagnostic sample, and from the clients.

The measurements themselves are ``copra_core/diagnostics.py`` (Jensen gaps, pairwise
interpolation barriers, exactness error); ``RoundDiagnostics`` adapts a round's replies to
them and adds the per-client results (``clients``) and the interpolation curves
(``curves``) to the row. ``LocalDiagnostics`` reads what the clients measured on their own
data (``copra_core/local_diagnostics.py``, ``diagnostics.where``) out of the evaluate
replies: ``local/*`` metrics and per-client rows under ``local_clients``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from flwr.app import Message

from copra_core import local_diagnostics, protocol
from copra_core.adapters import AdapterState
from copra_core.allocation.masking import effective_state
from copra_core.allocation.merge import pad_average, product_average
from copra_core.config import DiagnosticsSettings
from copra_core.diagnostics import AdapterEvaluator, MaskedAverages, round_diagnostics
from strategies.base import ClientUpdate

log = logging.getLogger(__name__)


class RoundDiagnostics:
    """Measures a round's client adapters against the aggregate.

    Parameters
    ----------
    evaluator : AdapterEvaluator
        Evaluates adapters on the diagnostic sample (``copra_core/evaluator.py``).
    settings : DiagnosticsSettings
        Number of client pairs.
    grid : sequence of float
        Interpolation points (``RunConfig.interpolation_grid``).
    seed : int
        The run's seed: each round draws its pairs from ``seed * 10007 + round``.
    partial_updates : bool
        The rule accepts partial replies (allocation): clients are compared as the adapters
        their models held, and the averages are taken per module over the clients that
        trained it.
    """

    def __init__(
        self,
        evaluator: AdapterEvaluator,
        settings: DiagnosticsSettings,
        grid: Sequence[float],
        seed: int,
        partial_updates: bool,
    ) -> None:
        self.evaluator = evaluator
        self.settings = settings
        self.grid = grid
        self.seed = seed
        self.partial_updates = partial_updates

    def __call__(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        previous: Mapping[str, torch.Tensor],
        aggregate: AdapterState,
        offset_change: AdapterState,
    ) -> dict:
        """The round's ``barrier/*``, ``diag/*``, ``aggregation/*`` metrics, ``clients`` and ``curves``.

        ``previous`` is the global adapter this round's clients started from (partial
        replies refer to it), ``offset_change`` the change of the base offsets this round.
        """
        states, masked = [u.state for u in updates], None
        if self.partial_updates:
            partials = [(u.state, float(u.num_examples)) for u in updates]
            states = [effective_state(u.state, previous) for u in updates]
            product, dense = product_average(partials, previous)
            masked = MaskedAverages(factor=pad_average(partials, previous), product=product, dense=dense)
        metrics, clients, curves = round_diagnostics(
            states,
            [u.num_examples for u in updates],
            aggregate,
            self.evaluator,
            grid=self.grid,
            num_pairs=self.settings.pairs,
            seed=self.seed * 10_007 + server_round,
            offset_change=offset_change,
            masked=masked,
        )
        metrics["clients"] = [
            {
                protocol.PARTITION_ID: int(u.metrics.get(protocol.PARTITION_ID, -1)),
                protocol.NUM_EXAMPLES: u.num_examples,
                **c,
            }
            for u, c in zip(updates, clients, strict=True)
        ]
        metrics["curves"] = [vars(c) | {"pair": list(c.pair)} for c in curves]
        return metrics


class LocalDiagnostics:
    """Reduces the clients' own measurements (``diagnostics.where`` = clients or both).

    Parameters
    ----------
    grid : sequence of float
        Interpolation points (``RunConfig.interpolation_grid``): ``local/curve_<i>`` is the
        loss at ``grid[i]``.
    metric : str
        The task's metric (``accuracy``, ``token_accuracy``).
    """

    def __init__(self, grid: Sequence[float], metric: str) -> None:
        self.grid = list(grid)
        self.metric = metric

    def __call__(self, replies: Sequence[Message]) -> dict:
        """The round's ``local/*`` metrics and ``local_clients``; removes the ``local/*`` keys from the replies.

        Removed so the replies go on to Flower's federated evaluation as before (Flower
        requires every reply to carry the same metric keys, and a client that did not
        train this round reports none). Replies in error are skipped.
        """
        reports: list[tuple[int, dict[str, float]]] = []
        for reply in replies:
            if reply.has_error():
                continue
            record = protocol.reply_metrics(reply)
            _, local = local_diagnostics.split_local(record)
            for key in local:
                del record[key]
            if local:
                reports.append((int(local.pop(local_diagnostics.PARTITION, -1)), local))
        reports.sort(key=lambda report: report[0])
        metrics, rows = local_diagnostics.reduce_local(reports, self.grid, self.metric)
        if not reports:
            log.info("client-side diagnostics: no evaluated client trained this round")
            return {}
        return {**metrics, "local_clients": rows}
