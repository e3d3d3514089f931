"""Sequence classification (SST-2 by default) on an encoder with a classification head."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from copra_core import data
from copra_core.config import split_csv
from copra_core.model_loading import load_pretrained, quiet_transformers
from copra_core.tasks.base import (
    DATA_LABEL_COUNTS,
    DATA_SKIPPED_ROWS,
    DATA_TRAIN_ROWS,
    DATA_VAL_ROWS,
    Batch,
    ClientExamples,
    LazyEncoded,
    Task,
)

Example = dict[str, list[int] | int]


@lru_cache(maxsize=4)
def _tokenizer(model_path: str) -> PreTrainedTokenizerBase:
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(model_path)


class SequenceClassificationTask(Task):
    name: ClassVar[str] = "sequence_classification"
    metric: ClassVar[str] = "accuracy"

    @property
    def spec(self) -> data.TextClassificationSpec:
        return data.dataset_spec(self.config.data.dataset)

    @property
    def own_labels(self) -> bool:
        """Whether the run declares its label space (``data.labels``): own data, a path or node files."""
        return bool(split_csv(self.config.data.labels))

    @property
    def num_labels(self) -> int:
        """The head's size: the declared labels (own data), else the registered dataset's."""
        return len(split_csv(self.config.data.labels)) if self.own_labels else self.spec.num_labels

    @property
    def own_columns(self) -> tuple[str, ...]:
        """The declared text columns of own data (``data.text-columns``)."""
        return tuple(split_csv(self.config.data.text_columns))

    def load_model(self) -> tuple[nn.Module, list[str]]:
        return load_pretrained(
            AutoModelForSequenceClassification,
            self.model_path,
            self.config.model,
            num_labels=self.num_labels,
        )

    # ------------------------------------------------------------------ data
    def _encode(self, dataset, text_columns: tuple[str, ...] | None = None) -> LazyEncoded:
        """Lazily tokenised rows; ``text_columns``: own data's (default: the registered dataset's)."""
        tokenizer = _tokenizer(self.model_path)
        columns = [
            dataset[c][:] for c in text_columns or self.spec.text_columns
        ]  # [:] = one Arrow read, not row by row
        labels = dataset["label"][:]
        max_length = self.config.model.max_length

        def encode(i: int) -> Example:
            ids = tokenizer(*(column[i] for column in columns), truncation=True, max_length=max_length)["input_ids"]
            return {"input_ids": ids, "label": labels[i]}

        return LazyEncoded(len(labels), encode)

    def client_examples(self, partition_id: int, num_partitions: int) -> tuple[list[Example], list[Example]]:
        train, val = data.client_splits(self.config.data, partition_id, num_partitions, self.config.seed)
        return self._encode(train), self._encode(val)

    def client_data(
        self, partition_id: int, num_partitions: int, node_files: data.NodeFiles | None = None
    ) -> ClientExamples:
        """A registered dataset's partition (as ``client_examples``), or own data: a path or the node's files."""
        if node_files is None and not self.config.data.is_path:
            return super().client_data(partition_id, num_partitions)
        own = data.path_client_data(self.config.data, partition_id, num_partitions, self.config.seed, node_files)
        summary = {
            DATA_TRAIN_ROWS: len(own.train),
            DATA_VAL_ROWS: len(own.val),
            DATA_SKIPPED_ROWS: own.skipped_rows,
            DATA_LABEL_COUNTS: own.label_counts,
        }
        return ClientExamples(
            self._encode(own.train, self.own_columns), self._encode(own.val, self.own_columns), summary
        )

    def server_examples(self, size: int) -> list[Example]:
        if self.config.data.own_data:
            return self._encode(data.path_eval_split(self.config.data, self.config.seed, size), self.own_columns)
        return self._encode(data.server_eval_split(self.config.data, self.config.seed, size))

    def calibration_examples(self, size: int) -> list[Example]:
        if self.config.data.own_data:
            rows = data.path_calibration_split(self.config.data, self.config.seed, size)
            return self._encode(rows, self.own_columns)
        return self._encode(data.calibration_split(self.config.data, self.config.seed, size))

    def collate(self, examples: Sequence[Example]) -> Batch:
        tokenizer = _tokenizer(self.model_path)
        batch = tokenizer.pad([{"input_ids": e["input_ids"]} for e in examples], return_tensors="pt")
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return dict(batch)

    # ------------------------------------------------------------------ loss / metric
    def batch_stats(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss = nn.functional.cross_entropy(logits.float(), labels)
        n = labels.numel()
        stats = {
            "loss_sum": float(loss.detach()) * n,
            "correct": float((logits.argmax(-1) == labels).sum()),
            "count": float(n),
        }
        return loss, stats

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        count = max(sums.get("count", 0.0), 1.0)
        return {"loss": sums.get("loss_sum", 0.0) / count, "accuracy": sums.get("correct", 0.0) / count}
