"""Instruction-tuning data (Dolly-15k, vendored in data/dolly/) and its client partitions.

Records have ``instruction``, ``context`` (may be empty), ``response``, ``category`` and
``split``. ``split`` is the federated split of FedIT/Shepherd and FLoRA, made upstream:
``client_0`` ... ``client_9`` (each 2-3 categories, ~1,490 records) and ``test`` (80
records, 10 per category), see data/MANIFEST.md. It is the ``dolly-fedit`` partitioning;
the flwr-datasets partitioners (iid, dirichlet, pathological) also work, over the 14,931
training records with the category as the label.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from datasets import Dataset

from copra_core import data
from copra_core.config import ConfigError, DataSettings

FIELDS = ("instruction", "context", "response", "category", "split")
#: The partitioning that follows the records' own ``split`` field.
FEDIT_PARTITION = "dolly-fedit"


@dataclass(frozen=True)
class InstructSpec:
    """Where a vendored instruction dataset lives and what its split looks like."""

    name: str
    file: str
    categories: tuple[str, ...]
    #: Clients of the upstream federated split (``client_0`` ... ``client_{n-1}``).
    fedit_clients: int
    test_split: str = "test"


DATASETS: dict[str, InstructSpec] = {
    "dolly": InstructSpec(
        name="dolly",
        file="dolly/dolly15k.jsonl.gz",
        categories=(
            "brainstorming",
            "classification",
            "closed_qa",
            "creative_writing",
            "general_qa",
            "information_extraction",
            "open_qa",
            "summarization",
        ),
        fedit_clients=10,
    ),
}


def instruct_spec(name: str) -> InstructSpec:
    if name not in DATASETS:
        raise ConfigError(
            f"Config key 'data.dataset': '{name}' is not an instruction dataset (task causal_lm); "
            f"known: {sorted(DATASETS)}"
        )
    return DATASETS[name]


def data_file(settings: DataSettings) -> Path:
    spec = instruct_spec(settings.dataset)
    return data.resolve_data_dir(settings, wanted=spec.file) / spec.file


@lru_cache(maxsize=2)
def read_records(path: Path, spec: InstructSpec) -> Dataset:
    """All records of ``path`` (gzip JSON Lines) as a Dataset, plus ``label`` = category index.

    The label column lets flwr-datasets' label-based partitioners split by category.
    Every record is checked; a bad one is reported with its line number.
    """
    if not path.is_file():
        raise data.DataFileError(
            f"Dataset file not found: {path} (dataset '{spec.name}'). "
            "Set config key 'data.dir' or $COPRA_FL_DATA_DIR to the folder holding data/."
        )
    columns: dict[str, list] = {name: [] for name in (*FIELDS, "label")}
    splits = {spec.test_split, *(f"client_{i}" for i in range(spec.fedit_clients))}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not JSON: {err}") from err
            bad = [k for k in FIELDS if not isinstance(record.get(k), str)]
            if bad:
                raise ValueError(f"{path}:{line_no}: fields {bad} missing or not strings")
            if record["category"] not in spec.categories:
                raise ValueError(f"{path}:{line_no}: unknown category {record['category']!r}")
            if record["split"] not in splits:
                raise ValueError(f"{path}:{line_no}: unknown split {record['split']!r}")
            for name in FIELDS:
                columns[name].append(record[name])
            columns["label"].append(spec.categories.index(record["category"]))
    return Dataset.from_dict(columns)


def _split_indices(records: Dataset, wanted: str) -> list[int]:
    return [i for i, split in enumerate(records["split"]) if split == wanted]


def training_pool(settings: DataSettings) -> Dataset:
    """Every record outside the global test split (what the clients' partitions come from)."""
    spec = instruct_spec(settings.dataset)
    records = read_records(data_file(settings), spec)
    return records.select([i for i, split in enumerate(records["split"]) if split != spec.test_split])


def test_split(settings: DataSettings) -> Dataset:
    """The global held-out test split (80 records for Dolly), in file order."""
    spec = instruct_spec(settings.dataset)
    records = read_records(data_file(settings), spec)
    return records.select(_split_indices(records, spec.test_split))


def check_partitioning(settings: DataSettings, num_partitions: int) -> None:
    """Raise ConfigError if ``data.partition`` cannot give ``num_partitions`` clients."""
    spec = instruct_spec(settings.dataset)
    if settings.partition == FEDIT_PARTITION and num_partitions != spec.fedit_clients:
        raise ConfigError(
            f"Config key 'federation.clients' is {num_partitions}, but data.partition={FEDIT_PARTITION} is "
            f"the upstream split of exactly {spec.fedit_clients} clients; set federation.clients="
            f"{spec.fedit_clients} (sample fewer per round with federation.fraction-train) or use a "
            "flwr-datasets partitioner (iid | dirichlet | pathological)."
        )


@lru_cache(maxsize=4)
def _partitioner(path: Path, settings_key: tuple, num_partitions: int, seed: int):
    settings = DataSettings(**dict(settings_key))
    partitioner = data.make_partitioner(settings, num_partitions, seed)
    partitioner.dataset = training_pool(settings)
    return partitioner


def client_partition(settings: DataSettings, partition_id: int, num_partitions: int, seed: int) -> Dataset:
    """One client's records: its upstream ``client_N`` split, or a flwr-datasets partition."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside 0..{num_partitions - 1}")
    check_partitioning(settings, num_partitions)
    if settings.partition == FEDIT_PARTITION:
        spec = instruct_spec(settings.dataset)
        records = read_records(data_file(settings), spec)
        return records.select(_split_indices(records, f"client_{partition_id}"))
    key = tuple(sorted(vars(settings).items()))
    return _partitioner(data_file(settings), key, num_partitions, seed).load_partition(partition_id)


def client_splits(settings: DataSettings, partition_id: int, num_partitions: int, seed: int) -> tuple[Dataset, Dataset]:
    """One client's (train, local validation) records, as ``copra_core.data.client_splits``."""
    return data.split_partition(
        client_partition(settings, partition_id, num_partitions, seed), settings, partition_id, seed
    )


def server_eval_split(settings: DataSettings, seed: int, size: int = 0) -> Dataset:
    """The server's held-out set: the global test split, or a seeded sample of ``size`` of it."""
    return data.seeded_sample(test_split(settings), seed, size)


def calibration_split(settings: DataSettings, seed: int, size: int) -> Dataset:
    """A seeded sample of the training pool held by the server (LoRA-GA with ``init.source=server``)."""
    pool = training_pool(settings)
    return pool.shuffle(seed=seed + 7).select(range(min(size, len(pool))))


def generation_records(settings: DataSettings, count: int) -> Dataset:
    """``count`` fixed test records for generation, evenly spaced through the test split.

    The test split is sorted by category (10 each for Dolly), so 8 prompts are one per
    category. Independent of the run's seed: every run answers the same prompts.
    """
    test = test_split(settings)
    count = min(count, len(test))
    return test.select([i * len(test) // count for i in range(count)]) if count else test.select([])
