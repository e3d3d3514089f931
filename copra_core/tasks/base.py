"""The task contract: everything that differs between, say, classification and causal LM.

Trainer, strategies and diagnostics only see this interface, so a new task (model head,
batches, loss, metric) plugs in without touching them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from copra_core.config import RunConfig
from copra_core.model_loading import resolve_model_path

Batch = dict[str, torch.Tensor]
#: Keys of a client's data summary (the round-0 data check's reply, ``copra_core/protocol.py``).
DATA_TRAIN_ROWS = "data-train-rows"
DATA_VAL_ROWS = "data-val-rows"
DATA_SKIPPED_ROWS = "data-skipped-rows"
DATA_LABEL_COUNTS = "data-label-counts"


class ClientExamples(NamedTuple):
    """A client's encoded (train, validation) examples and its data summary (numbers only)."""

    train: Sequence
    val: Sequence
    summary: dict[str, int | list[int]]


class LazyEncoded(Sequence):
    """Raw records encoded on first access, then kept.

    A client's partition can hold thousands of records of which a round touches only
    ``local_steps * batch_size``; encoding all of them up front dominated the start-up of
    short runs (about 2.5 s per SST-2 client). Per-record encoding is the same as batch
    encoding for unpadded, truncated inputs, so the examples are identical either way.
    """

    def __init__(self, size: int, encode: Callable[[int], Any]) -> None:
        self._size = size
        self._encode = encode
        self._cache: dict[int, Any] = {}

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._size))]
        if not -self._size <= index < self._size:
            raise IndexError(index)
        index %= self._size
        if index not in self._cache:
            self._cache[index] = self._encode(index)
        return self._cache[index]


class Task(ABC):
    """A learning task: data, model head, loss and metric."""

    name: ClassVar[str]
    #: Name of the task's headline metric in ``summarise`` (higher is better).
    metric: ClassVar[str]

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.model_path = resolve_model_path(config.model.name)

    @abstractmethod
    def load_model(self) -> tuple[nn.Module, list[str]]:
        """Load the base model; return it with the names of newly initialised modules."""

    @abstractmethod
    def client_examples(self, partition_id: int, num_partitions: int) -> tuple[Sequence, Sequence]:
        """Encoded (train, local validation) examples of one client."""

    @abstractmethod
    def server_examples(self, size: int) -> Sequence:
        """Encoded server evaluation examples (``size`` 0 = the whole evaluation split)."""

    @abstractmethod
    def calibration_examples(self, size: int) -> Sequence:
        """Encoded training examples the server holds for calibration (LoRA-GA), a seeded sample."""

    @abstractmethod
    def collate(self, examples: Sequence[Any]) -> Batch:
        """Stack encoded examples into model inputs (with labels)."""

    @abstractmethod
    def batch_stats(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss of a batch (for backward) and additive statistics for ``summarise``."""

    @abstractmethod
    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        """Turn summed statistics into metrics; must contain 'loss' and ``self.metric``."""

    # ------------------------------------------------------------------ optional hooks
    def client_data(self, partition_id: int, num_partitions: int, node_files: Any = None) -> ClientExamples:
        """A client's examples with the numbers of its round-0 data check.

        ``node_files`` (a ``copra_core.data.NodeFiles``): a deployed node's own files. The
        default serves registered datasets only; a task that reads own data overrides it.
        """
        if node_files is not None:
            raise ValueError(f"Task {self.name} does not read a node's own data files (node config data-path).")
        train, val = self.client_examples(partition_id, num_partitions)
        return ClientExamples(train, val, {DATA_TRAIN_ROWS: len(train), DATA_VAL_ROWS: len(val)})

    def check_inputs(self, num_partitions: int) -> None:
        """Fail fast, before any process starts, on data or settings that would fail later.

        Called by the simulation's preflight. The default checks nothing.
        """
        del num_partitions

    def after_round(self, model: nn.Module, server_round: int, num_rounds: int, out_dir: Path) -> dict[str, float]:
        """Server-side extra evaluation of the global adapter after a round; returns metrics for its row.

        Called right after the round's global evaluation, so ``model`` holds the new global
        adapter with every block active. May write files to ``out_dir`` (atomically). The
        default does nothing; the causal-LM task generates text and scores it with ROUGE-L.
        """
        del model, server_round, num_rounds, out_dir
        return {}

    # ------------------------------------------------------------------ batching
    def example_length(self, example: Any) -> int:
        """Token count of an encoded example (used to group batches by length)."""
        return len(example["input_ids"])

    def train_batches(
        self,
        examples: Sequence,
        batch_size: int,
        steps: int,
        seed: int,
        offset: int,
        group_by_length: bool = True,
    ) -> Iterator[Batch]:
        """``steps`` batches from a seeded endless shuffle, starting ``offset`` examples in.

        Stateless across rounds (the offset is derived from the round), so a client needs
        no memory between rounds and runs are reproducible. With ``group_by_length`` the
        round's examples are sorted by length into batches whose order is then shuffled
        (as transformers' ``group_by_length``): the same examples, far less padding.
        """
        n = len(examples)
        rng = np.random.default_rng(seed)
        needed = offset + steps * batch_size
        order = np.concatenate([rng.permutation(n) for _ in range(needed // n + 1)])
        window = order[offset:needed]
        if group_by_length:
            lengths = np.array([self.example_length(examples[int(i)]) for i in window])
            window = window[np.argsort(lengths, kind="stable")]
            chunks = window.reshape(steps, batch_size)
            chunks = chunks[np.random.default_rng(seed + offset + 1).permutation(steps)]
        else:
            chunks = window.reshape(steps, batch_size)
        for idx in chunks:
            yield self.collate([examples[int(i)] for i in idx])

    def eval_batches(self, examples: Sequence, batch_size: int) -> Iterator[Batch]:
        """Batches of similar length (order does not change summed metrics)."""
        order = sorted(range(len(examples)), key=lambda i: self.example_length(examples[i]))
        for start in range(0, len(order), batch_size):
            yield self.collate([examples[i] for i in order[start : start + batch_size]])
