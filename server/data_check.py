"""Round 0 of a run on own data: every node summarises its data; a node whose data does not fit is left out.

Before round 1 the server sends one ``query.data_summary`` message per node (through
``protocol.query_nodes``) with the run config. A node answers with numbers only: rows for
training and validation, rows skipped as bad (``data.bad-rows=skip``) and, unless
``data.share-label-counts=false``, its rows per label; or, when its data does not fit
the declared schema (a missing column, a label outside ``data.labels``, an empty or
undecodable file, a refused run-config path), one line giving the reason. Such a node is
named in the log and in metrics.jsonl (row 0, ``data/excluded``) and never sampled
(``server/sampling.py``); fewer than ``federation.min-train-nodes`` nodes left stops the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from copra_core import protocol
from copra_core.config import RunConfig
from copra_core.tasks.base import DATA_LABEL_COUNTS, DATA_SKIPPED_ROWS, DATA_TRAIN_ROWS, DATA_VAL_ROWS

log = logging.getLogger(__name__)


class NodeDataError(RuntimeError):
    """Too few nodes hold data that fits the run's schema; the message names each left-out node and why."""


@dataclass
class DataCheck:
    """The round-0 data check's outcome: the nodes left out and the metrics of row 0."""

    excluded: set[int] = field(default_factory=set)
    metrics: dict = field(default_factory=dict)


def check_node_data(grid: Grid, config: RunConfig) -> DataCheck:
    """Ask every node for its data summary; the nodes to leave out and ``data/*`` metrics.

    Raises ``NodeDataError`` when fewer than ``federation.min-train-nodes`` nodes remain.
    """
    content = RecordDict({protocol.CONFIG: ConfigRecord(dict(config.to_flat()))})  # type: ignore[arg-type]
    replies = protocol.query_nodes(
        grid,
        protocol.QUERY_DATA_SUMMARY,
        content,
        # Reading a node's file (and its model, first time) takes seconds: the connect wait's bound.
        timeout=config.federation.wait_for_nodes_s * 10,
        purpose="data check: node data summary",
    )
    nodes, excluded = [], []
    for reply in replies:
        node, metrics = reply.metadata.src_node_id, dict(protocol.reply_metrics(reply))
        partition = int(metrics[protocol.PARTITION_ID])
        if protocol.DATA_CHECK in reply.content.config_records:
            reason = str(reply.content.config_records[protocol.DATA_CHECK][protocol.REASON])
            log.warning("data check: node %d (partition %d) left out: %s", node, partition, reason)
            excluded.append({"node": node, "partition": partition, "reason": reason})
            continue
        summary = {"node": node, "partition": partition}
        for key in (DATA_TRAIN_ROWS, DATA_VAL_ROWS, DATA_SKIPPED_ROWS, DATA_LABEL_COUNTS):
            if key in metrics:
                value = metrics[key]
                summary[key] = [int(v) for v in value] if isinstance(value, list) else int(value)
        nodes.append(summary)
    answered = {r.metadata.src_node_id for r in replies}
    silent = [n for n in grid.get_node_ids() if n not in answered]
    for node in silent:  # no reply at all (failed or timed out): left out too, not silently sampled later
        excluded.append({"node": node, "partition": -1, "reason": "no data summary (the node failed or timed out)"})
    minimum = config.federation.min_train_nodes
    if len(nodes) < minimum:
        details = "; ".join(f"node {e['node']}: {e['reason']}" for e in excluded)
        raise NodeDataError(
            f"data check: {len(nodes)} node(s) hold data that fits the run's schema, fewer than "
            f"federation.min-train-nodes={minimum}. Left out: {details}"
        )
    log.info("data check: %d node(s) ok, %d left out", len(nodes), len(excluded))
    metrics = {
        "data/nodes_ok": float(len(nodes)),
        "data/nodes_excluded": float(len(excluded)),
        "data/skipped_rows": float(sum(n.get(DATA_SKIPPED_ROWS, 0) for n in nodes)),
        "data/clients": nodes,
        "data/excluded": excluded,
    }
    return DataCheck({e["node"] for e in excluded}, metrics)
