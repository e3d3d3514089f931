"""Vendored datasets (data/MANIFEST.md) and client partitioning with flwr-datasets.

Files are read with the csv module into in-memory ``datasets.Dataset`` objects:
``datasets.load_dataset("csv")`` would write an Arrow cache under the user's home,
which tests must not do, and the files are small.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import logging
import os
import urllib.parse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from copra_core.config import DataSettings, split_csv
from copra_core.local_data import (
    LocalDataError,
    ReadResult,
    TextSchema,
    is_natural_partition,
    natural_partition_files,
    read_text_classification,
)

log = logging.getLogger(__name__)

REPO_DATA_DIR = Path(__file__).resolve().parents[1] / "data"


@dataclass(frozen=True)
class TextClassificationSpec:
    """Where a vendored text-classification dataset lives and how to read it."""

    name: str
    train_file: str
    #: ``""``: no separate evaluation file; ``held_out_eval`` rows of the training file are
    #: held out instead (a fixed split, the same in every run).
    eval_file: str
    text_columns: tuple[str, ...]
    label_column: str
    label_names: tuple[str, ...]
    encoding: str = "utf-8"
    #: TSV without quoting (GLUE: bare quotes are text) or quoted CSV.
    delimiter: str = "\t"
    quoting: int = csv.QUOTE_NONE
    #: Column names for files without a header row (``()``: the first row is the header).
    columns: tuple[str, ...] = ()
    #: Added to the file's label to get 0-based labels (AG News counts from 1).
    label_offset: int = 0
    held_out_eval: int = 0

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


DATASETS: dict[str, TextClassificationSpec] = {
    "sst2": TextClassificationSpec(
        name="sst2",
        train_file="sst2/train.tsv",
        eval_file="sst2/dev.tsv",
        text_columns=("sentence",),
        label_column="label",
        label_names=("negative", "positive"),
    ),
    "mrpc": TextClassificationSpec(
        name="mrpc",
        train_file="mrpc/train.tsv",
        eval_file="mrpc/dev.tsv",
        text_columns=("#1 String", "#2 String"),
        label_column="Quality",
        label_names=("not_paraphrase", "paraphrase"),
        encoding="utf-8-sig",  # GLUE's MRPC files start with a byte-order mark
    ),
    # Only the official test file is vendored (the 120k-row train file is not available
    # offline): its 7,600 rows are split once, with a fixed seed, into 6,600 for the clients
    # and 1,000 for the server's evaluation.
    "ag_news": TextClassificationSpec(
        name="ag_news",
        train_file="ag_news/test.csv",
        eval_file="",
        text_columns=("title", "description"),
        label_column="class",
        label_names=("World", "Sports", "Business", "Sci/Tech"),
        delimiter=",",
        quoting=csv.QUOTE_MINIMAL,
        columns=("class", "title", "description"),
        label_offset=-1,
        held_out_eval=1000,
    ),
}

#: Seed of the fixed train/eval split of datasets that ship one file (not the run's seed:
#: the evaluation set must not change between runs).
HELD_OUT_SEED = 20_241_123


class DataFileError(FileNotFoundError):
    """A dataset file is missing; the message names the file and the config key."""


def _editable_install_data_dir() -> Path | None:
    """data/ of the checkout copra-fl was pip-installed from in editable mode, if any.

    ``flwr run .`` executes the app from an unpacked FAB, which holds only code and
    config (no TSV files), so the repository's data/ must be found through the install.
    """
    try:
        direct_url = importlib.metadata.distribution("copra-fl").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not direct_url:
        return None
    url = json.loads(direct_url).get("url", "")
    if not url.startswith("file://"):
        return None
    return Path(urllib.parse.unquote(url[len("file://") :])) / "data"


def resolve_data_dir(settings: DataSettings, wanted: str | None = None) -> Path:
    """The data folder, first match of: config key ``data.dir``, ``$COPRA_FL_DATA_DIR``,
    data/ beside this source tree, data/ of the editable install's checkout.

    ``wanted``: the file (relative to data/) that a candidate must hold; default: the
    training file of ``settings.dataset`` (datasets of other tasks pass their own).
    """
    if settings.dir:
        return Path(settings.dir).expanduser().resolve()
    env = os.environ.get("COPRA_FL_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    candidates = [REPO_DATA_DIR, _editable_install_data_dir()]
    wanted = wanted or dataset_spec(settings.dataset).train_file
    for candidate in candidates:
        # Check the data file itself: an unpacked FAB carries data/MANIFEST.md but no TSVs.
        if candidate is not None and (candidate / wanted).is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates if c is not None)
    raise DataFileError(f"No data folder found (tried {tried}); set config key 'data.dir' or $COPRA_FL_DATA_DIR.")


def dataset_spec(name: str) -> TextClassificationSpec:
    if name not in DATASETS:
        raise ValueError(f"Config key 'data.dataset': unknown dataset '{name}'; known: {sorted(DATASETS)}")
    return DATASETS[name]


@lru_cache(maxsize=8)
def read_split(data_dir: Path, spec: TextClassificationSpec, split: str) -> Dataset:
    """Read one split into an in-memory Dataset with the text columns and ``label``."""
    if split == "train" and not spec.held_out_eval:
        return _read_file(data_dir / spec.train_file, spec, split)
    if split != "train" and spec.eval_file:
        return _read_file(data_dir / spec.eval_file, spec, split)
    # One file for both: a fixed held-out split.
    parts = _read_file(data_dir / spec.train_file, spec, split).train_test_split(
        test_size=spec.held_out_eval, seed=HELD_OUT_SEED
    )
    return parts["train" if split == "train" else "test"]


def _read_file(path: Path, spec: TextClassificationSpec, split: str) -> Dataset:
    if not path.is_file():
        raise DataFileError(
            f"Dataset file not found: {path} (dataset '{spec.name}', split '{split}'). "
            "Set config key 'data.dir' or $COPRA_FL_DATA_DIR to the folder holding data/."
        )
    columns: dict[str, list] = {name: [] for name in spec.text_columns}
    labels: list[int] = []
    with path.open(encoding=spec.encoding, newline="") as handle:
        reader = csv.DictReader(
            handle, fieldnames=list(spec.columns) or None, delimiter=spec.delimiter, quoting=spec.quoting
        )
        missing = [c for c in (*spec.text_columns, spec.label_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; header is {reader.fieldnames}")
        for line_no, row in enumerate(reader, start=1 if spec.columns else 2):
            try:
                label = int(row[spec.label_column]) + spec.label_offset
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}:{line_no}: bad label {row[spec.label_column]!r}") from err
            if not 0 <= label < spec.num_labels:
                raise ValueError(f"{path}:{line_no}: label {label} outside 0..{spec.num_labels - 1}")
            for name in spec.text_columns:
                columns[name].append(row[name].strip())
            labels.append(label)
    return Dataset.from_dict({**columns, "label": labels})


def make_partitioner(settings: DataSettings, num_partitions: int, seed: int) -> Partitioner:
    if settings.partition == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if settings.partition == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=settings.dirichlet_alpha,
            min_partition_size=10,
            self_balancing=False,
            seed=seed,
        )
    if settings.partition == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=settings.classes_per_client,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    raise ValueError(f"Config key 'data.partition': unknown partitioner '{settings.partition}'")


@lru_cache(maxsize=4)
def _partitioner_for(
    data_dir: Path, spec: TextClassificationSpec, settings_key: tuple, num_partitions: int, seed: int
) -> Partitioner:
    settings = DataSettings(**dict(settings_key))
    partitioner = make_partitioner(settings, num_partitions, seed)
    partitioner.dataset = read_split(data_dir, spec, "train")
    return partitioner


def client_splits(settings: DataSettings, partition_id: int, num_partitions: int, seed: int) -> tuple[Dataset, Dataset]:
    """One client's (train, local validation) datasets."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside 0..{num_partitions - 1}")
    spec = dataset_spec(settings.dataset)
    key = tuple(sorted(vars(settings).items()))
    partitioner = _partitioner_for(resolve_data_dir(settings), spec, key, num_partitions, seed)
    return split_partition(partitioner.load_partition(partition_id), settings, partition_id, seed)


def split_partition(
    partition: Dataset, settings: DataSettings, partition_id: int, seed: int
) -> tuple[Dataset, Dataset]:
    """A client's partition split into (train, local validation): seeded, validation capped.

    Shared by every task's data module, so all clients of all tasks hold out alike.
    """
    if len(partition) < 2:
        raise ValueError(f"Partition {partition_id} holds {len(partition)} examples; too few to train.")
    split = partition.train_test_split(test_size=settings.val_fraction, seed=seed + partition_id)
    val = split["test"]
    if settings.val_max and len(val) > settings.val_max:
        val = val.select(range(settings.val_max))
    return split["train"], val


def seeded_sample(dataset: Dataset, seed: int, size: int) -> Dataset:
    """A seeded sample of ``size`` rows (all of them when ``size`` is 0 or not smaller)."""
    return dataset.shuffle(seed=seed).select(range(size)) if size and size < len(dataset) else dataset


def server_eval_split(settings: DataSettings, seed: int, size: int = 0) -> Dataset:
    """The server's fixed evaluation set: the dev split, or a seeded sample of ``size``."""
    spec = dataset_spec(settings.dataset)
    return seeded_sample(read_split(resolve_data_dir(settings), spec, "eval"), seed, size)


def calibration_split(settings: DataSettings, seed: int, size: int) -> Dataset:
    """A seeded sample of the training split held by the server (LoRA-GA with ``init.source=server``).

    It stands for a small calibration set the server owns; in simulation it is drawn from
    the same training file the clients' partitions come from.
    """
    spec = dataset_spec(settings.dataset)
    train = read_split(resolve_data_dir(settings), spec, "train")
    return train.shuffle(seed=seed + 7).select(range(min(size, len(train))))


# ------------------------------------------------------------------ own data (a path, a node's files)
@dataclass(frozen=True)
class NodeFiles:
    """A deployed node's own files, named by its node config (``data-path``, optional ``val-path``)."""

    train: str
    val: str = ""


@dataclass
class ClientData:
    """One client's (train, validation) rows and the numbers its round-0 data check reports."""

    train: Dataset
    val: Dataset
    skipped_rows: int
    #: Rows per label index, train and validation together.
    label_counts: list[int]


def own_schema(settings: DataSettings) -> TextSchema:
    """The run's declared schema (``data.text-columns``, ``data.label-column``, ``data.labels``)."""
    return TextSchema(tuple(split_csv(settings.text_columns)), settings.label_column, tuple(split_csv(settings.labels)))


def source_identity(settings: DataSettings, node_files: NodeFiles | None) -> tuple:
    """What a client's rows are read from, with every file's size and modification time.

    Part of the example cache's key (``copra_core/learner.py``): an edited file is read again.
    """
    paths = [node_files.train, node_files.val] if node_files else [settings.dataset]
    identity = []
    for name in paths:
        if not name:
            continue
        path = Path(name).expanduser()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        identity += [(str(p.resolve()), *_stat(p)) for p in files]
    return tuple(identity)


def _stat(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (-1, -1)  # a missing file: reading it names it
    return (stat.st_size, stat.st_mtime_ns)


def path_client_data(
    settings: DataSettings, partition_id: int, num_partitions: int, seed: int, node_files: NodeFiles | None = None
) -> ClientData:
    """One client's own data: the node's files, a natural-partition file, or a partition of one file.

    ``node_files`` (deployment): the node's ``data-path`` and optional ``val-path`` (else
    ``data.val-fraction`` of its rows). Otherwise ``data.dataset`` is a path: a folder of
    per-client files gives client i file i (``federation.clients`` must equal the file
    count); a file is split with ``data.partition`` like a registered dataset.
    Errors are ``LocalDataError`` naming the file (the round-0 data check reports them).
    """
    schema, bad_rows = own_schema(settings), settings.bad_rows
    if node_files is not None:
        result = read_text_classification(Path(node_files.train).expanduser(), schema, bad_rows)
        if node_files.val:
            val = read_text_classification(Path(node_files.val).expanduser(), schema, bad_rows)
            val_rows = val.dataset
            if settings.val_max and len(val_rows) > settings.val_max:
                val_rows = val_rows.select(range(settings.val_max))
            return _client_data(result.dataset, val_rows, result.skipped_rows + val.skipped_rows, schema)
        train, val_split = split_partition(result.dataset, settings, partition_id, seed)
        return _client_data(train, val_split, result.skipped_rows, schema)
    path = Path(settings.dataset).expanduser()
    if is_natural_partition(path):
        files = natural_partition_files(path)
        if len(files) != num_partitions:
            raise LocalDataError(
                f"{path}: a natural partition of {len(files)} files needs federation.clients={len(files)}, "
                f"got {num_partitions} (client i trains on file i: {[f.name for f in files]})."
            )
        result = _read_cached(files[partition_id], schema, bad_rows, source_identity(settings, None))
        train, val = split_partition(result.dataset, settings, partition_id, seed)
        return _client_data(train, val, result.skipped_rows, schema)
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside 0..{num_partitions - 1}")
    identity = source_identity(settings, None)
    result = _read_cached(path, schema, bad_rows, identity)
    key = tuple(sorted(vars(settings).items()))
    partitioner = _path_partitioner(path, schema, identity, key, num_partitions, seed)
    train, val = split_partition(partitioner.load_partition(partition_id), settings, partition_id, seed)
    # A shared file: its skipped rows are the file's, reported alike by every client.
    return _client_data(train, val, result.skipped_rows, schema)


def _client_data(train: Dataset, val: Dataset, skipped_rows: int, schema: TextSchema) -> ClientData:
    labels = np.concatenate(
        [np.asarray(train["label"][:], dtype=np.int64), np.asarray(val["label"][:], dtype=np.int64)]
    )
    counts = np.bincount(labels, minlength=len(schema.labels))
    return ClientData(train, val, skipped_rows, [int(c) for c in counts])


@lru_cache(maxsize=8)
def _read_cached(path: Path, schema: TextSchema, bad_rows: str, identity: tuple) -> ReadResult:
    del identity  # part of the cache key only: an edited file is read again
    return read_text_classification(path, schema, bad_rows)  # type: ignore[arg-type]


@lru_cache(maxsize=4)
def _path_partitioner(
    path: Path, schema: TextSchema, identity: tuple, settings_key: tuple, num_partitions: int, seed: int
) -> Partitioner:
    settings = DataSettings(**dict(settings_key))
    partitioner = make_partitioner(settings, num_partitions, seed)
    partitioner.dataset = _read_cached(path, schema, settings.bad_rows, identity).dataset
    return partitioner


def path_eval_split(settings: DataSettings, seed: int, size: int = 0) -> Dataset:
    """The server's evaluation set for own data: ``data.eval-path``, or a seeded sample of ``size`` rows."""
    if not settings.eval_path:
        raise LocalDataError(
            "The server has no evaluation data: the run uses own data (data.labels) and data.eval-path is empty "
            "(set data.server-eval=none, or data.eval-path to a labelled file)."
        )
    result = read_text_classification(Path(settings.eval_path).expanduser(), own_schema(settings), settings.bad_rows)
    return seeded_sample(result.dataset, seed, size)


def path_calibration_split(settings: DataSettings, seed: int, size: int) -> Dataset:
    """LoRA-GA's server calibration sample for a path: rows of the file (simulation only)."""
    path = Path(settings.dataset).expanduser()
    if not settings.is_path or is_natural_partition(path):
        raise LocalDataError(
            f"Config key 'init.source': the server holds no training rows of the clients' own data ({path}); "
            "use init.source=clients."
        )
    train = _read_cached(path, own_schema(settings), settings.bad_rows, source_identity(settings, None)).dataset
    return train.shuffle(seed=seed + 7).select(range(min(size, len(train))))
