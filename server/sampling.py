"""Reproducible client sampling: the same seed samples the same partitions in every run.

Flower's FedAvg samples ``random.sample(list(grid.get_node_ids()), k)`` with Python's
global RNG. Two things make that draw differ between runs with the same seed:

* node ids are drawn at random by every simulation (and are arbitrary in a deployment),
  so the same positions name different partitions;
* Flower's own background code (heartbeats, retry jitter) draws from the same global RNG,
  so its state at a round's sampling depends on timing, and a resumed run cannot restore it.

With ``federation.fraction-train < 1`` a CopRA-vs-LoRA comparison would then train the two
methods on different data, and a resumed run would not continue the interrupted one. So
``PartitionOrderedGrid`` asks each node once for its ``partition-id`` (a tiny
``query.partition`` message; nothing else leaves the node) and hands FedAvg the node ids
ordered by partition, and ``seeded_draw`` seeds the global RNG from (seed, round, phase)
for the draw alone: the sampled partitions are a function of those three.

Nodes whose data failed the round-0 data check (``server/data_check.py``) are ``exclude``d:
no draw of the run sees them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from copra_core import protocol

log = logging.getLogger(__name__)


class NodeSampler:
    """Where FedAvg's draws of nodes come from: by partition when it draws a subset, seeded per round.

    Parameters
    ----------
    seed : int
        Seeds each round's draw (the run's ``seed``).
    partial : bool
        Whether some phase samples a fraction of the nodes. Only a partial sample depends
        on the nodes' order; a full one skips the partition query.
    timeout : float
        Seconds to wait for a new node's partition id.
    """

    def __init__(self, seed: int, partial: bool, timeout: float) -> None:
        self.seed = seed
        self.partial = partial
        self.timeout = timeout
        self._partition_of: dict[int, int] = {}
        #: Nodes never drawn (their data failed the round-0 data check).
        self.excluded: frozenset[int] = frozenset()

    def exclude(self, nodes: Iterable[int]) -> None:
        """Leave ``nodes`` out of every later draw."""
        self.excluded = self.excluded | frozenset(nodes)
        if self.excluded:
            log.info("sampling: nodes %s left out of every draw", sorted(self.excluded))

    @contextmanager
    def draw(self, grid: Grid, server_round: int, phase: str) -> Iterator[Grid]:
        """The grid FedAvg draws from, under the seeded draw of (seed, round, phase)."""
        if self.excluded:
            grid = WithoutNodes(grid, self.excluded)  # type: ignore[assignment]
        if self.partial:
            grid = PartitionOrderedGrid(grid, self._partition_of, self.timeout)  # type: ignore[assignment]
            grid.refresh()  # the query's messages must not run inside the seeded draw
        with seeded_draw(self.seed, server_round, phase):
            yield grid


class WithoutNodes:
    """A view of ``grid`` whose ``get_node_ids`` leaves out ``excluded``; everything else is the grid's."""

    def __init__(self, grid: Grid, excluded: frozenset[int]) -> None:
        self._grid = grid
        self._excluded = excluded

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self._grid.get_node_ids() if node not in self._excluded]


class PartitionOrderedGrid:
    """A view of ``grid`` whose ``get_node_ids`` lists the nodes ordered by partition id.

    Everything else is delegated to the grid. FedAvg's sampling reads only
    ``get_node_ids``, so overriding that one call is enough; the strategy's own message
    flow stays Flower's.

    Parameters
    ----------
    grid : Grid
        The run's grid.
    partition_of : dict
        Node id -> partition id, filled as nodes appear (shared across rounds).
    timeout : float
        Seconds to wait for the partition replies of newly seen nodes.
    """

    def __init__(self, grid: Grid, partition_of: dict[int, int], timeout: float) -> None:
        self._grid = grid
        self._partition_of = partition_of
        self._timeout = timeout

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def refresh(self) -> list[int]:
        """Ask the nodes not seen before for their partition (outside the seeded draw); the node ids."""
        nodes = list(self._grid.get_node_ids())
        unknown = [n for n in nodes if n not in self._partition_of]
        if unknown:
            self._partition_of.update(ask_partitions(self._grid, unknown, self._timeout))
        return nodes

    def get_node_ids(self) -> Iterable[int]:
        nodes = self.refresh()  # a node that joined since the strategy's refresh() is asked now
        missing = [n for n in nodes if n not in self._partition_of]
        if missing:
            # Not silent: these nodes are still sampled, after the known ones, in node-id order.
            log.warning("sampling: nodes %s did not report a partition id; sampled after the others", missing)
        return sorted(nodes, key=lambda n: (n not in self._partition_of, self._partition_of.get(n, 0), n))


def ask_partitions(grid: Grid, nodes: list[int], timeout: float) -> dict[int, int]:
    """Node id -> partition id for ``nodes``, from one ``query.partition`` message each."""
    replies = protocol.query_nodes(
        grid,
        protocol.QUERY_PARTITION,
        RecordDict({protocol.CONFIG: ConfigRecord({})}),
        timeout=timeout,
        nodes=nodes,
        purpose="sampling: partition query",
    )
    return {reply.metadata.src_node_id: protocol.partition_of(reply) for reply in replies}


@contextmanager
def seeded_draw(seed: int, server_round: int, phase: str) -> Iterator[None]:
    """Seed Python's global RNG for one FedAvg draw, then put its previous state back.

    A string seed is hashed with SHA-512 by ``random.seed``: the same in every process,
    whatever ``PYTHONHASHSEED`` is.
    """
    state = random.getstate()
    random.seed(f"copra-fl sampling {seed} {phase} {server_round}")
    try:
        yield
    finally:
        random.setstate(state)
