"""A node's own data files: read with Arrow, checked against the run's declared schema.

Real federations train on files that never leave their node. This module turns such a
file (CSV, TSV, JSON Lines, Parquet, or a folder written by ``datasets.Dataset.save_to_disk``)
into an in-memory ``datasets.Dataset`` with the run's text columns and an integer
``label`` column, mapped through the run's declared label space (``data.labels``), so every
node maps its rows to the same indices whatever order its own file lists them in.

Files are read with pyarrow's readers, not ``datasets.load_dataset``: the latter writes an
Arrow cache under the user's home, which a node operator did not ask for. The Arrow table
holds the file's columns at about the file's size; tokenisation stays lazy (``LazyEncoded``
in ``copra_core/tasks/base.py``), so a million-row file starts its first round without
encoding every row first (``benchmarks/local_data.py`` measures it).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

from copra_core.config import DATA_FILE_SUFFIXES

log = logging.getLogger(__name__)

#: File suffixes read as one table each (a folder of such files is a natural partition).
TABLE_SUFFIXES = DATA_FILE_SUFFIXES
BadRows = Literal["error", "skip"]
#: How many offending lines an error names (the first ones).
SHOWN_LINES = 5


class LocalDataError(ValueError):
    """A node's data file does not fit the run's schema; the message names the file and lines."""


@dataclass(frozen=True)
class TextSchema:
    """The run's declared schema of a text-classification file.

    Attributes
    ----------
    text_columns : tuple of str
        Columns holding the text (one, or two for sentence pairs).
    label_column : str
        Column holding the label, as a label name (``"positive"``) or a value whose text
        is a label name (``1`` for labels ``0,1``).
    labels : tuple of str
        The ordered label names: the run's label space; index i is class i everywhere.
    """

    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.text_columns:
            raise LocalDataError("Config key 'data.text-columns': name at least one text column.")
        if not self.label_column:
            raise LocalDataError("Config key 'data.label-column': name the label column.")
        if len(self.labels) < 2:
            raise LocalDataError(
                f"Config key 'data.labels': declare the ordered label names (at least two), got {list(self.labels)}."
            )
        if len(set(self.labels)) != len(self.labels):
            raise LocalDataError(f"Config key 'data.labels': label names repeat: {list(self.labels)}.")


@dataclass
class ReadResult:
    """A checked file: its rows (text columns + ``label``) and what was left out."""

    dataset: Dataset
    path: Path
    skipped_rows: int = 0
    #: Rows per label index (the round-0 summary's label counts).
    label_counts: list[int] = field(default_factory=list)


def read_table(path: Path) -> pa.Table:
    """The file (or ``save_to_disk`` folder) at ``path`` as an Arrow table; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise LocalDataError(f"Data file not found: {path}.")
    try:
        if path.is_dir():
            if not (path / "state.json").is_file():
                raise LocalDataError(
                    f"{path}: a folder must be written by datasets.Dataset.save_to_disk (state.json missing); "
                    "a folder of one file per client is read with natural_partition_files()."
                )
            from datasets import load_from_disk  # memory-mapped Arrow files, no cache written

            return load_from_disk(str(path)).data.table
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            from pyarrow import csv

            # Every column as text: labels are matched by name, and "007" must stay "007".
            return csv.read_csv(
                path,
                parse_options=csv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","),
                # An empty field is a missing value (a bad row), not an empty text.
                convert_options=csv.ConvertOptions(
                    column_types=_all_strings(path, suffix), strings_can_be_null=True, quoted_strings_can_be_null=True
                ),
            )
        if suffix in (".jsonl", ".json"):
            from pyarrow import json

            return json.read_json(path)
        if suffix == ".parquet":
            from pyarrow import parquet

            return parquet.read_table(path)
    except LocalDataError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError, OSError) as err:
        raise LocalDataError(f"{path}: cannot be read as {path.suffix or 'a dataset folder'}: {err}") from err
    raise LocalDataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(TABLE_SUFFIXES)}.")


def _all_strings(path: Path, suffix: str) -> dict[str, pa.DataType]:
    """Column types for the CSV reader: every header column read as a string."""
    from pyarrow import csv

    delimiter = "\t" if suffix == ".tsv" else ","
    # Reading the header alone: the reader's schema inference would otherwise turn digits into ints.
    with csv.open_csv(path, parse_options=csv.ParseOptions(delimiter=delimiter)) as reader:
        return {name: pa.string() for name in reader.schema.names}


def first_line(path: Path) -> int:
    """File line of row 0: header lines count in CSV/TSV; JSON Lines count from 1; else row index."""
    return 2 if Path(path).suffix.lower() in (".csv", ".tsv") else 1


def read_text_classification(path: Path, schema: TextSchema, bad_rows: BadRows = "error") -> ReadResult:
    """Read ``path`` and check it against ``schema``.

    A row is bad when a text column or the label is missing (null) or its label is not one
    of ``schema.labels``. ``bad_rows="error"`` raises naming the file and the first
    offending lines; ``"skip"`` drops them and counts them (``ReadResult.skipped_rows``).
    A missing column or an empty file is always an error.
    """
    if bad_rows not in ("error", "skip"):
        raise LocalDataError(f"Config key 'data.bad-rows': '{bad_rows}' is not one of error, skip.")
    path = Path(path)
    table = read_table(path)
    missing = [c for c in (*schema.text_columns, schema.label_column) if c not in table.column_names]
    if missing:
        raise LocalDataError(
            f"{path}: missing columns {missing} (config keys 'data.text-columns', 'data.label-column'); "
            f"the file has {table.column_names}."
        )
    if table.num_rows == 0:
        raise LocalDataError(f"{path}: the file holds no rows.")

    label_text = pc.cast(table[schema.label_column], pa.string())
    label_index = pc.index_in(label_text, value_set=pa.array(schema.labels, pa.string()))
    good = pc.is_valid(label_index)
    for column in schema.text_columns:
        good = pc.and_(good, pc.is_valid(table[column]))
    good = pc.fill_null(good, False)
    bad = pc.indices_nonzero(pc.invert(good)).to_pylist()
    if bad and bad_rows == "error":
        offset = first_line(path)
        shown = ", ".join(f"line {i + offset} ({_reason(table, i, schema, label_text)})" for i in bad[:SHOWN_LINES])
        more = f" and {len(bad) - SHOWN_LINES} more" if len(bad) > SHOWN_LINES else ""
        raise LocalDataError(
            f"{path}: {len(bad)} bad rows: {shown}{more}. Fix the file, or set data.bad-rows=skip to leave them out."
        )
    columns = {c: table[c] for c in schema.text_columns} | {"label": pc.cast(label_index, pa.int64())}
    checked = pa.table(columns).filter(good) if bad else pa.table(columns)
    counts = pc.value_counts(checked["label"]).to_pylist()
    label_counts = [0] * len(schema.labels)
    for entry in counts:
        label_counts[entry["values"]] = entry["counts"]
    if checked.num_rows == 0:
        raise LocalDataError(f"{path}: no row left after skipping {len(bad)} bad rows.")
    if bad:
        log.warning("%s: skipped %d bad rows (data.bad-rows=skip)", path, len(bad))
    # An explicit fingerprint: without one, datasets hashes the table by pickling it whole,
    # which peaked at 2.4 GB for a 71 MB million-row CSV (benchmarks/local_data.py).
    dataset = Dataset(checked, fingerprint=_fingerprint(path, schema, bad_rows))
    return ReadResult(dataset, path, skipped_rows=len(bad), label_counts=label_counts)


def _fingerprint(path: Path, schema: TextSchema, bad_rows: str) -> str:
    """Identifies the file's checked content: its path, size and modification time, and the schema."""
    stat = path.stat()
    key = repr((str(path.resolve()), stat.st_size, stat.st_mtime_ns, schema, bad_rows))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _reason(table: pa.Table, row: int, schema: TextSchema, label_text: pa.ChunkedArray) -> str:
    for column in schema.text_columns:
        if not table[column][row].is_valid:
            return f"no '{column}'"
    value = label_text[row].as_py()
    if value is None:
        return f"no '{schema.label_column}'"
    return f"label {value!r} not in data.labels"


def natural_partition_files(folder: Path) -> list[Path]:
    """The files of a natural-partition folder, sorted by name: client i trains on file i."""
    folder = Path(folder)
    files = sorted(
        p for p in folder.iterdir() if (p.is_file() and p.suffix.lower() in TABLE_SUFFIXES) or _is_saved_dataset(p)
    )
    if not files:
        raise LocalDataError(
            f"{folder}: no data files ({', '.join(TABLE_SUFFIXES)} or save_to_disk folders) for a natural partition."
        )
    return files


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file()


def is_natural_partition(path: Path) -> bool:
    """A folder of per-client files (not itself a ``save_to_disk`` folder)."""
    return Path(path).is_dir() and not _is_saved_dataset(Path(path))
