"""The messages between the ServerApp and the ClientApp: every record key, and their codecs.

Both sides import this module (``server/`` and ``client/`` must not import each other), so
a key is spelt once. A message's ``RecordDict`` holds:

=====================  ==============  ==========================================================
record key             record type     content
=====================  ==============  ==========================================================
``arrays``             ArrayRecord     the global adapter (server -> client) or the client's reply
``config``             ConfigRecord    the flat run config, plus ``server-round`` / ``num-rounds``
``metrics``            MetricRecord    a reply's metrics, always with ``partition-id`` and
                                       (train, query) ``num-examples``
``base-offset``        ArrayRecord     base-weight offsets every client applies (fp32)
``omitted``            ConfigRecord    LoRA modules left out of ``arrays`` and their CRC32
``allocation``         ConfigRecord    HeteroLoRA allocation: ``modules`` and ``ranking``
``gradients``          ArrayRecord     a client's LoRA-GA gradient estimate (query reply)
``scores``             MetricRecord    a client's proxy score per module (query reply)
``data-check``         ConfigRecord    why a node's data does not fit the schema (data-summary reply)
=====================  ==============  ==========================================================

Message types: Flower's ``train`` and ``evaluate``, and four queries: the plain ``query``
(LoRA-GA gradient estimate), ``query.proxy_scores`` (allocation), ``query.partition``
(partition-ordered sampling) and ``query.data_summary`` (the round-0 data check: row and
label counts, or the reason a node's data does not fit; numbers and that string only).
``query_nodes`` is the server's one way to ask every node something outside the training
rounds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from copra_core.adapters import AdapterState, from_array_record, to_array_record

if TYPE_CHECKING:
    from flwr.serverapp import Grid

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ record keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
BASE_OFFSET = "base-offset"
OMITTED = "omitted"
ALLOCATION = "allocation"
GRADIENTS = "gradients"
SCORES = "scores"
DATA_CHECK = "data-check"

# ------------------------------------------------------------------ keys inside records
#: Metrics of every reply (and keys of the node config, where a node's partition is set).
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
#: Node-config keys of a client's own budget (e.g. a small GPU): a fraction of the
#: candidate modules (a prefix of the server's ranking) and a LoRA rank.
NODE_BUDGET = "allocation-budget"
NODE_RANK = "lora-rank"
NUM_EXAMPLES = "num-examples"
#: Node-config keys of a node's own data (deployment): its training file, an optional
#: validation file, and an optional name that gives it a stable id without a partition-id.
DATA_PATH = "data-path"
VAL_PATH = "val-path"
NODE_NAME = "node-name"
#: Fields of the ``data-check`` record: why the data does not fit (one line, no row content).
REASON = "reason"
#: CRC32 of a client's offset base (train replies, when the message carried offsets).
BASE_CRC32 = "base-crc32"
#: Whether proxy scoring had to probe B (all B = 0) (proxy-score replies).
PROBED_B = "probed-b"
#: Prefix of the additive evaluation statistics a client sends beside its metrics, so the
#: server can pool clients exactly (``server/metrics.py``).
SUM_PREFIX = "sum/"
#: Added to the run config in train messages (Flower's FedAvg adds ``server-round``).
SERVER_ROUND = "server-round"
NUM_ROUNDS = "num-rounds"
ROUND_KEYS = (SERVER_ROUND, NUM_ROUNDS)
#: Fields of the ``omitted`` and ``allocation`` config records.
MODULES = "modules"
CRC32 = "crc32"
RANKING = "ranking"

# ------------------------------------------------------------------ message types
#: Query actions (the ClientApp's ``@app.query(action)``); the gradient query is the plain one.
PROXY_SCORES_ACTION = "proxy_scores"
PARTITION_ACTION = "partition"
DATA_SUMMARY_ACTION = "data_summary"
QUERY_GRADIENTS = MessageType.QUERY
QUERY_PROXY_SCORES = f"{MessageType.QUERY}.{PROXY_SCORES_ACTION}"
QUERY_PARTITION = f"{MessageType.QUERY}.{PARTITION_ACTION}"
QUERY_DATA_SUMMARY = f"{MessageType.QUERY}.{DATA_SUMMARY_ACTION}"


# ------------------------------------------------------------------ codecs
def adapter_record(state: Mapping[str, torch.Tensor], transport_dtype: str = "float32") -> ArrayRecord:
    """An adapter (or gradients, offsets) as it travels, cast to ``transport_dtype``."""
    return to_array_record(state, transport_dtype)


def read_arrays(msg: Message, key: str = ARRAYS) -> AdapterState:
    """The fp32 tensors of the message's ArrayRecord ``key``."""
    return from_array_record(msg.content.array_records[key])


def read_offsets(msg: Message) -> AdapterState:
    """The base offsets sent with the adapter ({} when the message carries none)."""
    records = msg.content.array_records
    return from_array_record(records[BASE_OFFSET]) if BASE_OFFSET in records else {}


def omitted_record(modules: Sequence[str], crc32: int) -> ConfigRecord:
    """The ``omitted`` record: modules left out of the adapter and the CRC32 of their values."""
    return ConfigRecord({MODULES: list(modules), CRC32: crc32})


def read_omitted(msg: Message) -> tuple[list[str], int] | None:
    """(modules, CRC32) of the ``omitted`` record, or None when the whole adapter was sent."""
    if OMITTED not in msg.content.config_records:
        return None
    record = msg.content.config_records[OMITTED]
    return list(record[MODULES]), int(record[CRC32])


def allocation_record(modules: Sequence[str], ranking: Sequence[str]) -> ConfigRecord:
    """The ``allocation`` record: the modules in use and the ranking of every candidate."""
    return ConfigRecord({MODULES: list(modules), RANKING: list(ranking)})


def read_allocation(msg: Message) -> tuple[list[str], list[str]] | None:
    """(modules, ranking) of the ``allocation`` record, or None when no allocation is in force."""
    if ALLOCATION not in msg.content.config_records:
        return None
    record = msg.content.config_records[ALLOCATION]
    return list(record[MODULES]), list(record[RANKING])


def reply_metrics(msg: Message) -> MetricRecord:
    """A reply's ``metrics`` record."""
    return msg.content.metric_records[METRICS]


def partition_of(msg: Message) -> int:
    """The partition id a reply reports."""
    return int(reply_metrics(msg)[PARTITION_ID])


def num_examples_of(msg: Message) -> int:
    """The example count a reply reports (its weight)."""
    return int(reply_metrics(msg)[NUM_EXAMPLES])


def reply(
    msg: Message, metrics: Mapping[str, object], records: Mapping[str, ArrayRecord | MetricRecord] | None = None
) -> Message:
    """The reply to ``msg``: ``records`` (e.g. ``{ARRAYS: ...}``) and the ``metrics`` record."""
    content = RecordDict({**(records or {}), METRICS: MetricRecord(dict(metrics))})  # type: ignore[arg-type]
    return Message(content=content, reply_to=msg)


def query_content(arrays: ArrayRecord, config: Mapping[str, object], omitted: ConfigRecord | None = None) -> RecordDict:
    """A query's content: the adapter to work at, the flat run config and, if any, the ``omitted`` record."""
    content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(dict(config))})  # type: ignore[arg-type]
    if omitted is not None:
        content[OMITTED] = omitted
    return content


# ------------------------------------------------------------------ asking every node
def query_nodes(
    grid: Grid,
    message_type: str,
    content: RecordDict,
    *,
    timeout: float,
    nodes: Iterable[int] | None = None,
    minimum: int = 0,
    purpose: str,
) -> list[Message]:
    """Send ``content`` to every node (or to ``nodes``); the replies without error, by partition.

    Failed nodes are logged and left out; fewer than ``minimum`` answers is a RuntimeError
    naming ``purpose`` (e.g. ``"init.source=clients: gradient estimate"``). Sorted by the
    partition id each reply reports, so whatever the order replies arrive in, what the
    server computes from them is reproducible. ``timeout`` bounds the wait: a node that
    never answers must not hang the run.
    """
    targets = list(grid.get_node_ids()) if nodes is None else list(nodes)
    messages = [Message(content=content, message_type=message_type, dst_node_id=node) for node in targets]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    failed = {r.metadata.src_node_id: r.error.reason for r in replies if r.has_error()}
    if failed:
        log.warning("%s: %d node(s) failed: %s", purpose, len(failed), failed)
    valid = [r for r in replies if not r.has_error()]
    if len(valid) < minimum:
        raise RuntimeError(
            f"{purpose}: {len(valid)} of {len(targets)} nodes answered, fewer than "
            f"federation.min-train-nodes={minimum} (failures: {failed})"
        )
    return sorted(valid, key=partition_of)
