"""Flower glue: FedAvg's message flow with the aggregation delegated to a rule.

Flower's FedAvg samples nodes, builds messages and collects replies; this subclass keeps
that shape and overrides the four steps of a round. What they do besides Flower's work
is done by small collaborators, one job each:

* ``server/sampling.py``: the seeded draw of nodes, by partition;
* ``server/offsets.py``: the base offsets sent with every message, the clients' base CRC32s;
* ``server/replies.py`` and ``server/screening.py``: from replies to checked client updates;
* ``server/diagnostics.py``: the barrier diagnostics of the round.

The rule (``strategies/``) combines the updates; HeteroLoRA allocation is the subclass
``server/allocation.py:AllocatedFedAvg``. What a round measured is returned by
``finish_round`` as one plain dict, the round's row in metrics.jsonl.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from copra_core import protocol
from copra_core.adapters import AdapterState, array_record_nbytes, check_compatible, from_array_record, to_array_record
from copra_core.config import ScreeningSettings
from server import replies as reply_checks
from server.diagnostics import LocalDiagnostics, RoundDiagnostics
from server.offsets import BaseOffsetBook, check_client_bases
from server.sampling import NodeSampler
from server.screening import ReplyScreen
from strategies.base import AggregationRule, ClientUpdate, StrategyContractError

log = logging.getLogger(__name__)

#: A message's records besides Flower's ``arrays`` and ``config`` (``copra_core/protocol.py``).
Records = Mapping[str, Any]
Method = TypeVar("Method", bound=Callable[..., Any])


def in_run_rounds(method: Method) -> Method:
    """Pass the run's round number where Flower passes its own.

    Flower numbers the rounds of each ``start`` from 1; a resumed run continues after its
    ``completed_rounds``, and its clients (schedules, seeds) and metrics need the run's numbers.
    """

    @functools.wraps(method)
    def renumbered(self: AdapterFedAvg, server_round: int, *args: Any) -> Any:
        return method(self, self.run_round(server_round), *args)

    return renumbered  # type: ignore[return-value]


@dataclass
class RoundLog:
    """What the current round measured so far, and when it started."""

    started: float = field(default_factory=time.perf_counter)
    metrics: dict = field(default_factory=dict)

    def seconds(self) -> float:
        return time.perf_counter() - self.started


class AdapterFedAvg(FedAvg):
    """FedAvg over LoRA adapters with a pluggable aggregation rule and per-round diagnostics.

    Parameters
    ----------
    rule : AggregationRule
        Combines the client adapters (``strategies/``).
    initial_state : AdapterState
        The global adapter before round 1 (fp32).
    transport_dtype : str
        Dtype of adapters on the wire (``float32`` or ``float16``).
    diagnostics : RoundDiagnostics, optional
        Barrier diagnostics, run on every aggregation.
    local_diagnostics : LocalDiagnostics, optional
        Reduces the diagnostics the clients measured on their own data from the evaluate
        replies (``diagnostics.where`` = clients or both).
    on_base_offset : callable, optional
        Applies the new base offsets to the server's own model after a round that changed them.
    base_checksum : callable, optional
        CRC32 of the server's own offset base; every client's must equal it.
    screening : ScreeningSettings, optional
        Checks on every reply (``server/screening.py``); a failing reply is logged and
        left out. None or disabled: a malformed reply stops the run with Flower's error.
    sampling_seed : int
        Seeds each round's draw of nodes (``server/sampling.py``).
    partition_timeout : float
        Seconds to wait for a new node's partition id. When a fraction of the nodes is
        sampled, nodes are drawn by partition, so the same seed picks the same partitions
        in every run, resumed or not.
    **fedavg_kwargs
        Passed to Flower's ``FedAvg`` (sampling fractions, minimum node counts and the
        federated-evaluation metrics aggregation, ``server.metrics.pooled_metrics``).
    """

    def __init__(
        self,
        rule: AggregationRule,
        initial_state: AdapterState,
        transport_dtype: str = "float32",
        diagnostics: RoundDiagnostics | None = None,
        local_diagnostics: LocalDiagnostics | None = None,
        on_base_offset: Callable[[AdapterState], None] | None = None,
        base_checksum: Callable[[], int] | None = None,
        screening: ScreeningSettings | None = None,
        sampling_seed: int = 0,
        partition_timeout: float = 60.0,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.rule = rule
        self.transport_dtype = transport_dtype
        self.diagnostics = diagnostics
        self.local_diagnostics = local_diagnostics
        self.on_base_offset = on_base_offset
        self.base_checksum = base_checksum
        self.screen: ReplyScreen | None = None
        if screening is not None and screening.enabled:
            self.screen = ReplyScreen(screening, transport_dtype, rule.partial_updates)
        partial_sample = self.fraction_train < 1 or 0 < self.fraction_evaluate < 1
        self.sampler = NodeSampler(sampling_seed, partial_sample, partition_timeout)
        self.base_offsets = BaseOffsetBook()
        # What the clients receive, decoded: the reference every reply is checked against.
        self.current: AdapterState = from_array_record(to_array_record(initial_state, transport_dtype))
        #: What the last round's clients started from (partial replies refer to it).
        self.previous: AdapterState = self.current
        #: Rounds completed before this ``start`` (a resumed run), see ``in_run_rounds``.
        self.completed_rounds = 0
        self._round = RoundLog()
        self._sampled: set[int] = set()

    # ------------------------------------------------------------------ set-up
    def initial_arrays(self) -> ArrayRecord:
        return to_array_record(self.current, self.transport_dtype)

    def set_init_offsets(self, offsets: AdapterState) -> None:
        """The initialisation's base offsets (computed once, before round 1), sent from now on."""
        self.base_offsets.set_init(offsets)

    def resume(self, completed_rounds: int, rule_offsets: AdapterState) -> None:
        """Continue after ``completed_rounds`` with the rule's offsets of that moment (from a checkpoint)."""
        self.completed_rounds = completed_rounds
        self.base_offsets.set_rule(rule_offsets)

    def run_round(self, flower_round: int) -> int:
        """The run's number of the round Flower numbers ``flower_round`` (they differ after a resume)."""
        return flower_round + self.completed_rounds

    @property
    def round_metrics(self) -> dict:
        """What the current round has measured so far (read-only use)."""
        return self._round.metrics

    def finish_round(self) -> dict:
        """The round's metrics, with ``time/round_s`` up to now (called after the server's evaluation)."""
        return {**self._round.metrics, "time/round_s": self._round.seconds()}

    # ------------------------------------------------------------------ extension points
    def before_round(self, server_round: int, grid: Grid) -> dict:
        """Work before a round's messages are built; returns metrics (allocation re-scores here)."""
        return {}

    def downlink(self, arrays: ArrayRecord) -> tuple[ArrayRecord, dict]:
        """The adapter record to send and the records every message carries (the base offsets)."""
        return arrays, self.base_offsets.records()

    def train_records(self) -> dict:
        """Records only train messages carry (none here; the allocation's decision)."""
        return {}

    def downlink_metrics(self, messages: list[Message]) -> dict:
        """``comm/bytes_down`` (adapter plus base offsets: every message carries the same) and ``clients/sampled``."""
        per_client = sum(array_record_nbytes(r) for r in messages[0].content.array_records.values()) if messages else 0
        return {"comm/bytes_down": per_client * len(messages), "clients/sampled": len(messages)}

    # ------------------------------------------------------------------ Flower's round
    @in_run_rounds
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round = RoundLog()
        self._round.metrics.update(self.before_round(server_round, grid))
        arrays, records = self.downlink(arrays)
        with self.sampler.draw(grid, server_round, "train") as sampling_grid:
            messages = list(super().configure_train(server_round, arrays, config, sampling_grid))
        _attach(messages, {**records, **self.train_records()})
        self._round.metrics.update(self.downlink_metrics(messages))
        self._sampled = {m.metadata.dst_node_id for m in messages}
        return messages

    @in_run_rounds
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        arrays, records = self.downlink(arrays)
        with self.sampler.draw(grid, server_round, "evaluate") as sampling_grid:
            messages = list(super().configure_evaluate(server_round, arrays, config, sampling_grid))
        return _attach(messages, records)

    @in_run_rounds
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        metrics = self._round.metrics
        valid, failed = reply_checks.split_replies(replies, "aggregate_train")
        metrics["clients/failed"] = len(failed)
        metrics.update(reply_checks.missing_nodes(server_round, self._sampled, valid))
        if self.screen is None:
            reply_checks.check_consistency(valid, self.weighted_by_key)  # the first odd reply ends the run
        else:
            valid, screened = self.screen(server_round, valid, self.current)  # odd replies are left out
            metrics.update(screened)
        if len(valid) < max(self.min_train_nodes, 1):
            # Too few usable replies: keep the global adapter rather than average a handful.
            log.warning(
                "round %s: %d usable replies < min_train_nodes=%d, global adapter unchanged",
                server_round,
                len(valid),
                self.min_train_nodes,
            )
            metrics["round/skipped"] = 1
            return None, None

        valid = reply_checks.by_partition(valid)
        metrics["comm/bytes_up"] = sum(array_record_nbytes(m.content.array_records[protocol.ARRAYS]) for m in valid)
        decoded = (reply_checks.client_update(m, self.current, partial=self.rule.partial_updates) for m in valid)
        # A single-pass rule without diagnostics gets a generator: one reply is decoded,
        # checked and added at a time, so the aggregation's memory does not grow with the
        # number of clients (benchmarks/aggregation.py). The diagnostics compare every
        # client with the aggregate, so they need the list.
        streaming = self.rule.single_pass and self.diagnostics is None
        updates = decoded if streaming else list(decoded)
        new_state = self._aggregate(server_round, updates)
        metrics.update({f"strategy/{k}": float(v) for k, v in self.rule.round_metrics().items()})
        metrics.update(check_client_bases(valid, self.base_checksum))
        new_offsets, offset_change = self.base_offsets.proposed(self.rule.base_offset())
        # Send, local training, receive and aggregation: the part a bare training loop also has.
        metrics["time/train_s"] = self._round.seconds()
        # Encode first: the diagnostics must score the adapter the clients will receive.
        arrays = to_array_record(new_state, self.transport_dtype)
        self.previous, self.current = self.current, from_array_record(arrays)
        if self.diagnostics is not None:
            started = time.perf_counter()
            measured = self.diagnostics(server_round, updates, self.previous, self.current, offset_change)  # type: ignore[arg-type]
            metrics.update(measured)
            metrics["time/diagnostics_s"] = time.perf_counter() - started
        if new_offsets or self.base_offsets.rule:
            self.base_offsets.set_rule(new_offsets)
            if self.on_base_offset is not None:
                self.on_base_offset(self.base_offsets.all)

        train_metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        identity = (protocol.NUM_EXAMPLES, protocol.PARTITION_ID)
        metrics.update({f"train/{k}": v for k, v in train_metrics.items() if k not in identity})
        return arrays, train_metrics

    @in_run_rounds
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if self.local_diagnostics is not None:
            replies = list(replies)  # read twice: the clients' own diagnostics, then Flower's evaluation
            self._round.metrics.update(self.local_diagnostics(replies))
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            federated = {f"federated/{k}": v for k, v in metrics.items() if k != protocol.NUM_EXAMPLES}
            self._round.metrics.update(federated)
        return metrics

    def _aggregate(self, server_round: int, updates: Iterable[ClientUpdate]) -> AdapterState:
        """The rule's output, checked: the adapter's keys and shapes, finite values."""
        new_state = self.rule.aggregate(updates, self.current)
        check_compatible(new_state, self.current, source=f"output of strategy {type(self.rule).__name__}")
        broken = sorted(key for key, value in new_state.items() if not torch.isfinite(value).all())
        if broken:
            # A NaN/Inf global adapter would poison every later round: stop here, say where.
            raise StrategyContractError(
                f"Strategy {type(self.rule).__name__} produced non-finite values in round {server_round}: {broken[:5]}"
            )
        return new_state


def _attach(messages: list[Message], records: Records) -> list[Message]:
    """Add ``records`` to every message."""
    for message in messages:
        for key, record in records.items():
            message.content[key] = record
    return messages
