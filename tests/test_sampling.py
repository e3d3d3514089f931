"""Sampling by partition: the same seed picks the same partitions whatever the node ids."""

from __future__ import annotations

import logging
import random
from types import SimpleNamespace

import pytest

from copra_core.protocol import QUERY_PARTITION as QUERY
from server.sampling import PartitionOrderedGrid, seeded_draw

pytestmark = pytest.mark.usefixtures("run_identity")  # tests/conftest.py


class FakeGrid:
    """Nodes with given ids and partitions; records the partition queries it answers."""

    def __init__(self, partition_of: dict[int, int], silent: frozenset[int] = frozenset()) -> None:
        self.partition_of = partition_of
        self.silent = silent
        self.queried: list[int] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.partition_of)  # by node id: unrelated to the partitions

    def send_and_receive(self, messages, timeout):
        assert timeout == 5.0
        replies = []
        for message in messages:
            assert message.metadata.message_type == QUERY
            node = message.metadata.dst_node_id
            self.queried.append(node)
            if node in self.silent:
                continue
            metrics = {"metrics": {"partition-id": self.partition_of[node]}}
            replies.append(
                SimpleNamespace(
                    metadata=SimpleNamespace(src_node_id=node),
                    has_error=lambda: False,
                    content=SimpleNamespace(metric_records=metrics),
                )
            )
        return replies


def _grid(seed: int, partitions: int = 8, **kwargs) -> FakeGrid:
    ids = random.Random(seed).sample(range(1, 2**40), partitions)  # random like a simulation's
    return FakeGrid(dict(zip(ids, range(partitions), strict=True)), **kwargs)


def _sampled_partitions(grid, seed: int, k: int) -> list[int]:
    random.seed(seed)  # what server/app.py does; FedAvg then calls random.sample
    return sorted(grid.partition_of[n] for n in random.sample(list(grid.get_node_ids()), k))


def test_the_same_seed_samples_the_same_partitions_with_different_node_ids():
    a, b = _grid(1), _grid(2)
    for seed in range(5):
        view_a, view_b = PartitionOrderedGrid(a, {}, 5.0), PartitionOrderedGrid(b, {}, 5.0)
        chosen_a = sorted(a.partition_of[n] for n in _draw(view_a, seed, 3))
        chosen_b = sorted(b.partition_of[n] for n in _draw(view_b, seed, 3))
        assert chosen_a == chosen_b
    # Without the view the same seeds pick different partitions (what the view fixes).
    assert any(_sampled_partitions(a, s, 3) != _sampled_partitions(b, s, 3) for s in range(5))


def _draw(view: PartitionOrderedGrid, seed: int, k: int) -> list[int]:
    with seeded_draw(seed, 1, "train"):
        return random.sample(list(view.get_node_ids()), k)  # FedAvg's draw


def test_a_seeded_draw_ignores_and_keeps_the_global_rng_state():
    draws = []
    for noise in (0, 1, 2):
        random.seed(noise)  # what Flower's background draws leave behind differs by timing
        random.random()
        before = random.getstate()
        with seeded_draw(7, 3, "train"):
            draws.append(random.sample(range(100), 5))
        assert random.getstate() == before
    assert draws[0] == draws[1] == draws[2]
    with seeded_draw(7, 4, "train"):
        other_round = random.sample(range(100), 5)
    with seeded_draw(7, 3, "evaluate"):
        other_phase = random.sample(range(100), 5)
    assert other_round != draws[0] and other_phase != draws[0]


def test_each_node_is_asked_once_and_new_nodes_are_asked_when_they_appear():
    grid = _grid(3, partitions=4)
    known: dict[int, int] = {}
    view = PartitionOrderedGrid(grid, known, 5.0)
    order = list(view.get_node_ids())
    assert [grid.partition_of[n] for n in order] == [0, 1, 2, 3]
    list(view.get_node_ids())
    assert sorted(grid.queried) == sorted(grid.partition_of)  # no second query
    grid.partition_of[7] = 4  # a node joins
    assert list(view.get_node_ids())[-1] == 7
    assert grid.queried[-1] == 7 and len(grid.queried) == 5


def test_a_node_without_a_partition_reply_is_named_and_sampled_last(caplog):
    grid = _grid(4, partitions=3)
    silent = sorted(grid.partition_of)[0]
    grid.silent = frozenset({silent})
    with caplog.at_level(logging.WARNING, logger="server.sampling"):
        order = list(PartitionOrderedGrid(grid, {}, 5.0).get_node_ids())
    assert order[-1] == silent
    assert str(silent) in caplog.text and "did not report a partition id" in caplog.text
