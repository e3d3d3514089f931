"""Train replies, from Flower's messages to checked ``ClientUpdate``s.

Flower's FedAvg checks replies with a private helper; the steps are written out here so
that the strategy can screen each reply instead of stopping at the first odd one:
``split_replies`` separates the errors, ``missing_nodes`` names the sampled nodes without
a usable reply, ``check_consistency`` is Flower's own all-or-nothing check (screening off)
and ``client_update`` decodes one reply and checks it against the global adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
from flwr.app import Message
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from copra_core import protocol
from copra_core.adapters import check_compatible
from copra_core.allocation.masking import check_partial
from strategies.base import ClientUpdate

log = logging.getLogger(__name__)


def split_replies(replies: Iterable[Message], phase: str) -> tuple[list[Message], list[Message]]:
    """(replies with content, replies with an error), the errors logged with their node."""
    valid: list[Message] = []
    failed: list[Message] = []
    for msg in replies:
        (failed if msg.has_error() else valid).append(msg)
    log.info("%s: received %d results and %d failures", phase, len(valid), len(failed))
    for msg in failed:
        log.info("error in the reply of node %d: %s", msg.metadata.src_node_id, msg.error.reason)
    return valid, failed


def check_consistency(replies: Sequence[Message], weighted_by_key: str) -> None:
    """Flower's check: one ArrayRecord and one MetricRecord per reply, the same keys in all.

    Raises ``InconsistentMessageReplies`` on the first odd reply (the run stops).
    """
    if replies:
        validate_message_reply_consistency(
            replies=[msg.content for msg in replies], weighted_by_key=weighted_by_key, check_arrayrecord=True
        )


def missing_nodes(server_round: int, sampled: set[int], valid: Sequence[Message]) -> dict:
    """``clients/missing``: the sampled nodes without a usable reply (dropped, timed out or failed)."""
    missing = sorted(sampled - {m.metadata.src_node_id for m in valid})
    metrics: dict = {"clients/missing": len(missing)}
    if missing:
        metrics["clients/missing_nodes"] = missing
        log.warning(
            "round %s: no reply from %d of %d sampled nodes %s; aggregating the %d replies received",
            server_round,
            len(missing),
            len(sampled),
            missing,
            len(valid),
        )
    return metrics


def by_partition(replies: list[Message]) -> list[Message]:
    """Replies in a fixed order (by partition, else node id): aggregation and diagnostics are reproducible."""
    return sorted(replies, key=lambda m: protocol.reply_metrics(m).get(protocol.PARTITION_ID, m.metadata.src_node_id))


def client_update(msg: Message, current: Mapping[str, torch.Tensor], *, partial: bool) -> ClientUpdate:
    """Decode one reply and check it against the global adapter (naming the client).

    ``partial``: the rule accepts replies with a subset of the modules at a lower rank.
    """
    state = protocol.read_arrays(msg)
    node = msg.metadata.src_node_id
    check = check_partial if partial else check_compatible
    check(state, current, source=f"adapter from client node {node}")
    metrics = dict(protocol.reply_metrics(msg))
    return ClientUpdate(node_id=node, state=state, num_examples=int(metrics[protocol.NUM_EXAMPLES]), metrics=metrics)
