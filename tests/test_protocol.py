"""The message protocol: record codecs round-trip, and ``query_nodes`` asks, drops, checks and sorts."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from copra_core import protocol

pytestmark = pytest.mark.usefixtures("run_identity")  # tests/conftest.py


class FakeGrid:
    """Nodes that answer with their partition id (in node order), or fail."""

    def __init__(self, partition_of: dict[int, int], failing: frozenset[int] = frozenset()) -> None:
        self.partition_of = partition_of
        self.failing = failing
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.partition_of)

    def send_and_receive(self, messages, timeout):
        self.sent = list(messages)
        replies = []
        for message in self.sent:
            node = message.metadata.dst_node_id
            failed = node in self.failing
            metrics = {protocol.METRICS: {protocol.PARTITION_ID: self.partition_of[node], protocol.NUM_EXAMPLES: 1}}
            replies.append(
                SimpleNamespace(
                    metadata=SimpleNamespace(src_node_id=node),
                    has_error=lambda failed=failed: failed,
                    error=SimpleNamespace(reason="out of memory"),
                    content=SimpleNamespace(metric_records=metrics),
                )
            )
        return replies


def _content() -> RecordDict:
    return RecordDict({protocol.CONFIG: ConfigRecord({})})


def test_query_nodes_drops_failures_and_sorts_by_partition(caplog):
    grid = FakeGrid({11: 2, 12: 0, 13: 3, 14: 1}, failing=frozenset({13}))
    with caplog.at_level(logging.WARNING):
        replies = protocol.query_nodes(
            grid, protocol.QUERY_PARTITION, _content(), timeout=1.0, minimum=3, purpose="test query"
        )
    assert [protocol.partition_of(r) for r in replies] == [0, 1, 2]
    assert [r.metadata.src_node_id for r in replies] == [12, 14, 11]
    assert {m.metadata.dst_node_id for m in grid.sent} == {11, 12, 13, 14}
    assert all(m.metadata.message_type == protocol.QUERY_PARTITION for m in grid.sent)
    assert "test query: 1 node(s) failed: {13: 'out of memory'}" in caplog.text


def test_query_nodes_asks_only_the_given_nodes_and_checks_the_minimum():
    grid = FakeGrid({11: 2, 12: 0, 13: 3}, failing=frozenset({12}))
    replies = protocol.query_nodes(grid, protocol.QUERY_PARTITION, _content(), timeout=1.0, nodes=[11, 12], purpose="q")
    assert [r.metadata.src_node_id for r in replies] == [11]
    assert [m.metadata.dst_node_id for m in grid.sent] == [11, 12]
    with pytest.raises(RuntimeError, match=r"allocation: proxy scores: 2 of 3 nodes answered.*min-train-nodes=3"):
        protocol.query_nodes(
            grid, protocol.QUERY_PROXY_SCORES, _content(), timeout=1.0, minimum=3, purpose="allocation: proxy scores"
        )


def test_records_round_trip():
    msg = Message(
        content=RecordDict({protocol.CONFIG: ConfigRecord({})}), message_type=protocol.QUERY_PARTITION, dst_node_id=1
    )
    assert protocol.read_offsets(msg) == {} and protocol.read_omitted(msg) is None
    assert protocol.read_allocation(msg) is None
    offsets = {"m.init_offset": torch.randn(3, 2)}
    msg.content[protocol.BASE_OFFSET] = protocol.adapter_record(offsets)
    msg.content[protocol.OMITTED] = protocol.omitted_record(["a", "b"], 123)
    msg.content[protocol.ALLOCATION] = protocol.allocation_record(["b"], ["b", "a"])
    assert torch.equal(protocol.read_offsets(msg)["m.init_offset"], offsets["m.init_offset"])
    assert protocol.read_omitted(msg) == (["a", "b"], 123)
    assert protocol.read_allocation(msg) == (["b"], ["b", "a"])
    half = protocol.adapter_record(offsets, "float16")
    assert next(iter(half.values())).dtype == "float16"
