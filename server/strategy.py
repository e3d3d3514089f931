"""Flower glue: FedAvg's message flow with the aggregation delegated to a rule.

Flower's FedAvg samples nodes, builds messages and checks replies; this subclass only
changes what happens to the replies: they become ``ClientUpdate``s, are checked against
the global adapter, combined by the configured ``AggregationRule`` and measured by the
barrier diagnostics. Everything else is Flower's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from copra_core.adapters import (
    AdapterState,
    array_record_nbytes,
    check_compatible,
    from_array_record,
    to_array_record,
)
from copra_core.allocation.downlink import RECORD_KEY as OMITTED_KEY
from copra_core.allocation.masking import RECORD_KEY as ALLOCATION_KEY
from copra_core.allocation.masking import check_partial
from copra_core.base_offset import RECORD_KEY as OFFSETS_KEY
from copra_core.base_offset import module_of
from copra_core.config import ScreeningSettings
from copra_core.screening import check_update, norm_outliers, update_norm
from server.sampling import PartitionOrderedGrid, seeded_draw
from strategies.base import AggregationRule, ClientUpdate, StrategyContractError

if TYPE_CHECKING:
    from server.allocation import Allocator

log = logging.getLogger(__name__)

#: Called after aggregation with (round, updates, new global adapter, change of the base
#: offsets this round keyed by module); returns metrics.
DiagnosticsHook = Callable[[int, Sequence[ClientUpdate], AdapterState, AdapterState], dict]


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
    diagnostics : DiagnosticsHook, optional
        Barrier diagnostics, run on every aggregation.
    on_base_offset : callable, optional
        Applies the rule's new base offsets to the server's own model after a round.
    base_checksum : callable, optional
        CRC32 of the server's own offset base; every client's must equal it.
    screening : ScreeningSettings, optional
        Checks on every reply (``copra_core/screening.py``); a failing reply is logged and
        left out. None = no screening: a malformed reply then stops the run with an error.
    allocator : Allocator, optional
        HeteroLoRA allocation (``server/allocation.py``): re-decided when due, attached to
        every train message; the rule must accept partial replies. Messages then leave out
        the modules still at their seeded value (``copra_core/allocation/downlink.py``).
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
        diagnostics: DiagnosticsHook | None = None,
        on_base_offset: Callable[[AdapterState], None] | None = None,
        base_checksum: Callable[[], int] | None = None,
        screening: ScreeningSettings | None = None,
        allocator: Allocator | None = None,
        sampling_seed: int = 0,
        partition_timeout: float = 60.0,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if allocator is not None and not rule.partial_updates:
            raise StrategyContractError(
                f"allocation.enabled needs a rule that accepts partial replies (strategy.name=masked); "
                f"{type(rule).__name__} averages whole adapters and would read untrained modules as zeros"
            )
        self.allocator = allocator
        # Only a partial sample depends on the nodes' order; a full one skips the query.
        self._by_partition = self.fraction_train < 1 or 0 < self.fraction_evaluate < 1
        self._partition_of: dict[int, int] = {}
        self.partition_timeout = partition_timeout
        self.sampling_seed = sampling_seed
        self.rule = rule
        self.transport_dtype = transport_dtype
        self.diagnostics = diagnostics
        self.on_base_offset = on_base_offset
        self.base_checksum = base_checksum
        self.screening = screening
        #: Base offsets every client currently applies (always fp32 on the wire: part of the base):
        #: the initialisation's (LoRA-GA, fixed) and the rule's (residual, per round), and their
        #: encoded record, built once per change and attached to every message.
        self.init_offsets: AdapterState = {}
        self.rule_offsets: AdapterState = {}
        self._offsets_record: ArrayRecord | None = None
        # What the clients receive, decoded: the reference every reply is checked against.
        self.current: AdapterState = from_array_record(to_array_record(initial_state, transport_dtype))
        self.previous: AdapterState = self.current
        self.round_metrics: dict = {}
        #: Rounds completed before this ``start`` (a resumed run): Flower numbers the rounds
        #: of each ``start`` from 1, the clients and the metrics need the run's own numbers.
        self.completed_rounds = 0
        self._sampled: set[int] = set()

    def resume(self, completed_rounds: int, rule_offsets: AdapterState) -> None:
        """Continue after ``completed_rounds`` with the rule's offsets of that moment (from a checkpoint)."""
        self.completed_rounds = completed_rounds
        self.rule_offsets = dict(rule_offsets)
        self._encode_offsets()

    def initial_arrays(self) -> ArrayRecord:
        return to_array_record(self.current, self.transport_dtype)

    @property
    def offsets(self) -> AdapterState:
        """All base offsets the clients apply now (``<module>.init_offset`` and ``<module>.base_offset``)."""
        return {**self.init_offsets, **self.rule_offsets}

    def set_init_offsets(self, offsets: AdapterState) -> None:
        """The initialisation's offsets (computed once, before round 1), sent from now on."""
        self.init_offsets = from_array_record(to_array_record(offsets, "float32"))
        self._encode_offsets()

    def _encode_offsets(self) -> None:
        combined = self.offsets
        self._offsets_record = to_array_record(combined, "float32") if combined else None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.completed_rounds
        self.round_metrics = {"_t_start": time.perf_counter()}
        if self.allocator is not None and self.allocator.due(server_round):
            self.round_metrics.update(self.allocator.refresh(grid, server_round, self.current))
        arrays, omitted = self._trimmed(arrays)
        with self._sampling(grid, server_round, "train") as sampling_grid:
            messages = self._with_records(super().configure_train(server_round, arrays, config, sampling_grid), omitted)
        if self.allocator is not None:
            record = self.allocator.record()
            for message in messages:
                message.content[ALLOCATION_KEY] = record
            self.round_metrics["comm/modules_omitted"] = len(omitted["modules"]) if omitted else 0
        # Adapter plus base offsets, if any: every message carries the same records.
        per_client = sum(array_record_nbytes(r) for r in messages[0].content.array_records.values()) if messages else 0
        self.round_metrics["comm/bytes_down"] = per_client * len(messages)
        self.round_metrics["clients/sampled"] = len(messages)
        self._sampled = {m.metadata.dst_node_id for m in messages}
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.completed_rounds
        arrays, omitted = self._trimmed(arrays)
        with self._sampling(grid, server_round, "evaluate") as sampling_grid:
            return self._with_records(super().configure_evaluate(server_round, arrays, config, sampling_grid), omitted)

    def _trimmed(self, arrays: ArrayRecord) -> tuple[ArrayRecord, ConfigRecord | None]:
        """Under an allocation, the global adapter less the modules every client rebuilds from its seed."""
        if self.allocator is None:
            return arrays, None
        sent, omitted = self.allocator.downlink(self.current)
        return (to_array_record(sent, self.transport_dtype), omitted) if omitted is not None else (arrays, None)

    @contextmanager
    def _sampling(self, grid: Grid, server_round: int, phase: str) -> Iterator[Grid]:
        """The grid FedAvg draws from (by partition when it draws a subset), under a seeded draw."""
        if self._by_partition:
            grid = PartitionOrderedGrid(grid, self._partition_of, self.partition_timeout)  # type: ignore[assignment]
            grid.refresh()  # the query's messages must not run inside the seeded draw
        with seeded_draw(self.sampling_seed, server_round, phase):
            yield grid

    def _with_records(self, messages: Iterable[Message], omitted: ConfigRecord | None) -> list[Message]:
        """Attach the current base offsets (if the rule keeps any) and the omitted modules' record."""
        messages = list(messages)
        for message in messages:
            if self._offsets_record is not None:
                message.content[OFFSETS_KEY] = self._offsets_record
            if omitted is not None:
                message.content[OMITTED_KEY] = omitted
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.completed_rounds
        screening = self.screening is not None and self.screening.enabled
        # Flower's own consistency check raises on the first odd reply and so ends the run;
        # screening checks each reply instead and leaves out only the odd ones.
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=not screening)
        self.round_metrics["clients/failed"] = len(errors)
        self._log_missing(server_round, valid)
        if screening:
            valid = self._screen(server_round, valid)
        if len(valid) < max(self.min_train_nodes, 1):
            # Too few usable replies: keep the global adapter rather than average a handful.
            log.warning(
                "round %s: %d usable replies < min_train_nodes=%d, global adapter unchanged",
                server_round,
                len(valid),
                self.min_train_nodes,
            )
            self.round_metrics["round/skipped"] = 1
            return None, None

        # A fixed order (by partition), so aggregation and diagnostics are reproducible.
        valid.sort(key=lambda m: m.content.metric_records["metrics"].get("partition-id", m.metadata.src_node_id))
        self.round_metrics["comm/bytes_up"] = sum(
            array_record_nbytes(m.content.array_records[self.arrayrecord_key]) for m in valid
        )
        decoded = (self._client_update(msg) for msg in valid)
        # A single-pass rule without diagnostics gets a generator: one reply is decoded,
        # checked and added at a time, so the aggregation's memory does not grow with the
        # number of clients (benchmarks/aggregation.py). The diagnostics compare every
        # client with the aggregate, so they need the list.
        streaming = self.rule.single_pass and self.diagnostics is None
        updates = decoded if streaming else list(decoded)
        new_state = self.rule.aggregate(updates, self.current)
        check_compatible(new_state, self.current, source=f"output of strategy {type(self.rule).__name__}")
        broken = sorted(key for key, value in new_state.items() if not torch.isfinite(value).all())
        if broken:
            # A NaN/Inf global adapter would poison every later round: stop here, say where.
            raise StrategyContractError(
                f"Strategy {type(self.rule).__name__} produced non-finite values in round {server_round}: {broken[:5]}"
            )
        self.round_metrics.update({f"strategy/{k}": float(v) for k, v in self.rule.round_metrics().items()})
        self._check_client_bases(valid)
        new_offsets = from_array_record(to_array_record(self.rule.base_offset(), "float32"))
        offset_change = {
            module_of(key): value - self.rule_offsets.get(key, torch.zeros_like(value))
            for key, value in new_offsets.items()
        }
        # Send, local training, receive and aggregation: the part a bare training loop also has.
        self.round_metrics["time/train_s"] = time.perf_counter() - self.round_metrics["_t_start"]
        # Encode first: the diagnostics must score the adapter the clients will receive.
        arrays = to_array_record(new_state, self.transport_dtype)
        self.previous = self.current  # what this round's clients started from (partial replies refer to it)
        self.current = from_array_record(arrays)
        if self.diagnostics is not None:
            started = time.perf_counter()
            self.round_metrics.update(self.diagnostics(server_round, updates, self.current, offset_change))
            self.round_metrics["time/diagnostics_s"] = time.perf_counter() - started
        if new_offsets or self.rule_offsets:
            self.rule_offsets = new_offsets
            self._encode_offsets()
            if self.on_base_offset is not None:
                self.on_base_offset(self.offsets)

        train_metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        self.round_metrics.update(
            {f"train/{k}": v for k, v in train_metrics.items() if k not in ("num-examples", "partition-id")}
        )
        return arrays, train_metrics

    def _check_client_bases(self, replies: Sequence[Message]) -> None:
        """Clients with base offsets report a checksum of their base: all must equal the server's.

        Called before this round's new offsets are applied, so the server's model still
        has the base the clients trained on.
        """
        sums = {
            m.metadata.src_node_id: m.content.metric_records["metrics"]["base-crc32"]
            for m in replies
            if "base-crc32" in m.content.metric_records["metrics"]
        }
        if not sums:
            return
        self.round_metrics["clients/distinct_bases"] = len(set(sums.values()))
        self.round_metrics["clients/base_crc32"] = sorted(set(sums.values()))
        if len(set(sums.values())) > 1:
            raise RuntimeError(f"clients trained on different base weights (CRC32 per node: {sums})")
        if self.base_checksum is not None:
            server = self.base_checksum()
            self.round_metrics["server/base_crc32"] = server
            if server not in sums.values():
                raise RuntimeError(f"clients' base weights differ from the server's (CRC32 {server}; clients: {sums})")

    def _log_missing(self, server_round: int, valid: Sequence[Message]) -> None:
        """Name the sampled nodes without a usable reply (dropped, timed out or failed)."""
        missing = sorted(self._sampled - {m.metadata.src_node_id for m in valid})
        self.round_metrics["clients/missing"] = len(missing)
        if missing:
            self.round_metrics["clients/missing_nodes"] = missing
            log.warning(
                "round %s: no reply from %d of %d sampled nodes %s; aggregating the %d replies received",
                server_round,
                len(missing),
                len(self._sampled),
                missing,
                len(valid),
            )

    def _screen(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Drop replies that fail the checks, logging who and why (``clients/rejected``)."""
        assert self.screening is not None
        reasons: dict[int, str] = {}
        norms: dict[int, float] = {}
        for index, msg in enumerate(replies):
            arrays, metric_records = msg.content.array_records, msg.content.metric_records
            if list(arrays) != [self.arrayrecord_key] or list(metric_records) != ["metrics"]:
                reasons[index] = (
                    f"expected records '{self.arrayrecord_key}' and 'metrics', "
                    f"got {list(arrays)} and {list(metric_records)}"
                )
                continue
            # One reply decoded at a time: screening does not hold every client's adapter.
            record = arrays[self.arrayrecord_key]
            state = from_array_record(record)
            metrics = metric_records["metrics"]
            reason = check_update(
                state,
                self.current,
                {k: a.dtype for k, a in record.items()},
                self.transport_dtype,
                metrics.get(self.weighted_by_key),
                self.screening.max_num_examples,
                partial=self.rule.partial_updates,
            )
            if reason is None:
                norms[index] = update_norm(state, self.current)
            else:
                reasons[index] = reason
        reasons.update(norm_outliers(norms, self.screening.max_norm_ratio))
        rejected = []
        for index, reason in sorted(reasons.items()):
            msg = replies[index]
            partition = msg.content.metric_records.get("metrics", {}).get("partition-id", -1)
            log.warning(
                "round %s: rejected the reply of node %s (partition %s): %s",
                server_round,
                msg.metadata.src_node_id,
                partition,
                reason,
            )
            rejected.append({"node-id": msg.metadata.src_node_id, "partition-id": partition, "reason": reason})
        self.round_metrics["clients/rejected"] = len(rejected)
        if rejected:
            self.round_metrics["clients/rejections"] = rejected
        return [msg for index, msg in enumerate(replies) if index not in reasons]

    def _client_update(self, msg: Message) -> ClientUpdate:
        """Decode one reply and check it against the global adapter (naming the client)."""
        state = from_array_record(msg.content.array_records[self.arrayrecord_key])
        node = msg.metadata.src_node_id
        check = check_partial if self.rule.partial_updates else check_compatible
        check(state, self.current, source=f"adapter from client node {node}")
        metrics = dict(msg.content.metric_records["metrics"])
        return ClientUpdate(node_id=node, state=state, num_examples=int(metrics[self.weighted_by_key]), metrics=metrics)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.completed_rounds
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.round_metrics.update({f"federated/{k}": v for k, v in metrics.items() if k != "num-examples"})
        return metrics
