"""HeteroLoRA allocation rounds: ask the clients for proxy scores, decide, broadcast.

Before round 1 (static) or every ``allocation.every-rounds`` rounds (dynamic) the server
sends the current global adapter to every connected node as a ``query.proxy_scores``
message; each client scores every candidate module on its own batches and replies with
one number per module. The server averages the scores by example count, picks the modules
that fit the budget (``copra_core/allocation/budget.py``) and attaches the decision to
every train message until the next allocation round. Only scores travel, never data.

``AllocatedFedAvg`` is the strategy of an allocated run: ``AdapterFedAvg`` plus the
scoring rounds, the allocation record on train messages and the trimmed downlink.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from copra_core import protocol
from copra_core.adapters import AdapterState, array_record_nbytes, to_array_record
from copra_core.allocation.budget import Allocation, allocate, module_costs, weighted_scores
from copra_core.allocation.downlink import as_sent, modules_checksum, untouched_modules, without_modules
from copra_core.config import RunConfig
from server.strategy import AdapterFedAvg
from strategies.base import AggregationRule, StrategyContractError

log = logging.getLogger(__name__)

#: A MetricRecord value is a float64.
SCORE_BYTES = 8


class Allocator:
    """Decides and remembers the current allocation of a run, and trims the adapter it sends.

    ``seeded`` is the seeded initial adapter, which every node builds itself from the run
    config: modules still at that value are left out of the messages (``downlink``).
    """

    def __init__(self, config: RunConfig, seeded: Mapping[str, torch.Tensor]) -> None:
        self.config = config
        self.costs = module_costs(seeded)
        self.seeded = as_sent(seeded, config.federation.transport_dtype)
        self.current: Allocation | None = None

    def downlink(self, state: Mapping[str, torch.Tensor]) -> tuple[AdapterState, ConfigRecord | None]:
        """What to send of ``state`` (as the clients receive it) and the record naming what was left out.

        Untrained candidates keep their seeded value with B = 0, so under a budget most of
        the adapter need not travel (``copra_core/allocation/downlink.py``).
        """
        omitted = untouched_modules(state, self.seeded)
        if not omitted:
            return dict(state), None
        record = protocol.omitted_record(omitted, modules_checksum(self.seeded, omitted))
        return without_modules(state, omitted), record

    def due(self, server_round: int) -> bool:
        every = self.config.allocation.every_rounds
        return self.current is None or (every > 0 and (server_round - 1) % every == 0)

    def refresh(self, grid: Grid, server_round: int, state: Mapping[str, torch.Tensor]) -> dict:
        """Collect the clients' scores at ``state`` and decide; returns ``allocation/*`` metrics."""
        started = time.perf_counter()
        settings = self.config.allocation
        sent, omitted = self.downlink(state)
        arrays = ArrayRecord({k: v.contiguous() for k, v in sent.items()})
        nodes = list(grid.get_node_ids())
        # Bounded like round 0's gradient query: a silent node must not hang the run.
        valid = protocol.query_nodes(
            grid,
            protocol.QUERY_PROXY_SCORES,
            protocol.query_content(arrays, self.config.to_flat(), omitted),
            timeout=self.config.federation.wait_for_nodes_s * 10,
            nodes=nodes,
            minimum=self.config.federation.min_train_nodes,
            purpose="allocation: proxy scores",
        )
        per_client = [(dict(r.content.metric_records[protocol.SCORES]), protocol.num_examples_of(r)) for r in valid]
        unknown = sorted(set(per_client[0][0]) ^ set(self.costs))
        if unknown:
            raise RuntimeError(f"allocation: scores do not name the adapter's LoRA modules: {unknown[:3]}")
        scores = weighted_scores(per_client)
        self.current = allocate(
            scores,
            self.costs,
            budget=settings.budget,
            budget_params=settings.budget_params,
            seed=self.config.seed * 7919 + server_round,
        )
        log.info(
            "allocation for round %d (%s): %d of %d modules, %d trainable LoRA parameters",
            server_round,
            settings.proxy,
            len(self.current.modules),
            len(self.costs),
            self.current.params,
        )
        return {
            "allocation/modules": len(self.current.modules),
            "allocation/candidates": len(self.costs),
            "allocation/params": self.current.params,
            "allocation/clients": len(valid),
            "allocation/probed_b": int(any(protocol.reply_metrics(r)[protocol.PROBED_B] for r in valid)),
            "allocation/scoring_s": time.perf_counter() - started,
            # The scoring round's traffic: the trimmed adapter down to every node, one score per module up.
            "comm/allocation_bytes_down": array_record_nbytes(arrays) * len(nodes),
            "comm/allocation_bytes_up": sum(SCORE_BYTES * len(scores) for scores, _ in per_client),
            "allocation/enabled": list(self.current.modules),
        }

    def state_dict(self) -> dict:
        """The decision in force, JSON-able (the checkpoint keeps it for a resumed run)."""
        if self.current is None:
            return {}
        return {
            "modules": list(self.current.modules),
            "ranking": list(self.current.ranking),
            "params": self.current.params,
            "scores": dict(self.current.scores),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue with a checkpointed decision; a dynamic run re-scores on its own schedule."""
        if not state:
            return
        unknown = sorted(set(state["ranking"]) ^ set(self.costs))
        if unknown:
            raise ValueError(f"checkpointed allocation does not name this adapter's LoRA modules: {unknown[:3]}")
        self.current = Allocation(
            modules=tuple(state["modules"]),
            ranking=tuple(state["ranking"]),
            params=int(state["params"]),
            scores={k: float(v) for k, v in state["scores"].items()},
        )

    def record(self) -> ConfigRecord:
        """The decision as sent to the clients (``client/app.py`` reads it)."""
        assert self.current is not None
        return protocol.allocation_record(self.current.modules, self.current.ranking)


class AllocatedFedAvg(AdapterFedAvg):
    """``AdapterFedAvg`` under a HeteroLoRA allocation.

    Before a round that is due (``Allocator.due``) the clients score the modules and the
    server decides; every train message carries the decision; every message leaves out
    the modules still at their seeded value (``copra_core/allocation/downlink.py``). The
    rule must accept partial replies (``masked``).

    Parameters
    ----------
    rule : AggregationRule
        A rule with ``partial_updates``.
    initial_state : AdapterState
        The global adapter before round 1.
    allocator : Allocator
        Decides and remembers the allocation.
    **kwargs
        As ``AdapterFedAvg``.
    """

    def __init__(self, rule: AggregationRule, initial_state: AdapterState, allocator: Allocator, **kwargs: Any) -> None:
        if not rule.partial_updates:
            raise StrategyContractError(
                f"allocation.enabled needs a rule that accepts partial replies (strategy.name=masked); "
                f"{type(rule).__name__} averages whole adapters and would read untrained modules as zeros"
            )
        super().__init__(rule, initial_state, **kwargs)
        self.allocator = allocator
        self._omitted = 0

    def before_round(self, server_round: int, grid: Grid) -> dict:
        if not self.allocator.due(server_round):
            return {}
        return self.allocator.refresh(grid, server_round, self.current)

    def downlink(self, arrays: ArrayRecord) -> tuple[ArrayRecord, dict]:
        arrays, records = super().downlink(arrays)
        sent, omitted = self.allocator.downlink(self.current)
        self._omitted = len(omitted[protocol.MODULES]) if omitted is not None else 0
        if omitted is None:
            return arrays, records
        return to_array_record(sent, self.transport_dtype), {**records, protocol.OMITTED: omitted}

    def train_records(self) -> dict:
        return {protocol.ALLOCATION: self.allocator.record()}

    def downlink_metrics(self, messages: list[Message]) -> dict:
        return {"comm/modules_omitted": self._omitted, **super().downlink_metrics(messages)}
