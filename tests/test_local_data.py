"""Node-local data files: every format, the label space, bad rows, natural partitions."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset

from copra_core.local_data import (
    LocalDataError,
    TextSchema,
    is_natural_partition,
    natural_partition_files,
    read_text_classification,
)

SCHEMA = TextSchema(text_columns=("text",), label_column="label", labels=("negative", "positive"))
ROWS = [("good film", "positive"), ("dull", "negative"), ("loved it", "positive")]


def write(path, rows, fmt):
    """Write ``rows`` of (text, label) in ``fmt``, independently of the reader under test."""
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        path.write_text("text" + sep + "label\n" + "".join(f"{t}{sep}{lab}\n" for t, lab in rows), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [lab for _, lab in rows]}), path)
    elif fmt == "saved":
        Dataset.from_dict({"text": [t for t, _ in rows], "label": [lab for _, lab in rows]}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "saved"])
def test_every_format_reads_the_same_rows(tmp_path, fmt):
    path = write(tmp_path / f"node.{fmt}" if fmt != "saved" else tmp_path / "saved", ROWS, fmt)
    result = read_text_classification(path, SCHEMA)
    assert result.dataset["text"] == [t for t, _ in ROWS]
    assert result.dataset["label"] == [1, 0, 1]
    assert result.label_counts == [1, 2]
    assert result.skipped_rows == 0


def test_label_mapping_is_the_declared_order_not_the_files(tmp_path):
    # Two nodes list their labels in opposite orders; both map to the run's indices.
    a = read_text_classification(write(tmp_path / "a.csv", [("x", "positive"), ("y", "negative")], "csv"), SCHEMA)
    b = read_text_classification(write(tmp_path / "b.csv", [("y", "negative"), ("x", "positive")], "csv"), SCHEMA)
    label_of_a = dict(zip(a.dataset["text"], a.dataset["label"], strict=True))
    assert label_of_a == dict(zip(b.dataset["text"], b.dataset["label"], strict=True))
    assert a.dataset["label"] == [1, 0]


def test_numeric_labels_match_label_names_as_text(tmp_path):
    schema = TextSchema(("text",), "label", ("0", "1"))
    path = tmp_path / "n.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert read_text_classification(path, schema).dataset["label"] == [1, 0]
    # CSV keeps digits as text: "1" is label 1, not parsed and re-printed.
    assert read_text_classification(write(tmp_path / "n.csv", [("a", "1")], "csv"), schema).dataset["label"] == [1]


BAD = [("fine", "positive"), ("odd", "neutral"), ("", "negative"), ("ok", "negative"), ("x", "")]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_bad_rows_error_names_file_and_lines(tmp_path, fmt):
    path = write(tmp_path / f"bad.{fmt}", BAD, fmt)
    with pytest.raises(LocalDataError) as err:
        read_text_classification(path, SCHEMA, bad_rows="error")
    message = str(err.value)
    assert str(path) in message
    first = 2 if fmt == "csv" else 1  # header line
    assert f"line {1 + first} (label 'neutral' not in data.labels)" in message
    if fmt == "csv":  # an empty CSV field is a missing value
        assert f"line {2 + first} (no 'text')" in message
        assert f"line {4 + first} (no 'label')" in message
        assert "3 bad rows" in message


def test_bad_rows_skip_counts_and_keeps_the_rest(tmp_path):
    result = read_text_classification(write(tmp_path / "bad.csv", BAD, "csv"), SCHEMA, bad_rows="skip")
    assert result.dataset["text"] == ["fine", "ok"]
    assert result.dataset["label"] == [1, 0]
    assert result.skipped_rows == 3
    assert result.label_counts == [1, 1]


def test_missing_column_empty_file_and_undecodable_bytes(tmp_path):
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("sentence,label\nhi,positive\n")
    with pytest.raises(LocalDataError, match=r"missing columns \['text'\].*'sentence'"):
        read_text_classification(wrong, SCHEMA)
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(LocalDataError, match="holds no rows"):
        read_text_classification(empty, SCHEMA)
    binary = tmp_path / "latin1.csv"
    binary.write_bytes("text,label\ncaf\xe9,positive\n".encode("latin-1"))
    with pytest.raises(LocalDataError, match=r"latin1\.csv: cannot be read"):
        read_text_classification(binary, SCHEMA)
    (tmp_path / "x.xlsx").write_bytes(b"PK")
    with pytest.raises(LocalDataError, match=r"unsupported file type '\.xlsx'"):
        read_text_classification(tmp_path / "x.xlsx", SCHEMA)
    with pytest.raises(LocalDataError, match="not found"):
        read_text_classification(tmp_path / "absent.csv", SCHEMA)


def test_schema_is_checked():
    with pytest.raises(LocalDataError, match=r"data\.labels"):
        TextSchema(("text",), "label", ("only",))
    with pytest.raises(LocalDataError, match="repeat"):
        TextSchema(("text",), "label", ("a", "a"))
    with pytest.raises(LocalDataError, match=r"data\.text-columns"):
        TextSchema((), "label", ("a", "b"))


def test_natural_partition_folder_is_sorted_by_name(tmp_path):
    folder = tmp_path / "silos"
    folder.mkdir()
    write(folder / "b_bank.parquet", ROWS[:1], "parquet")
    write(folder / "a_clinic.csv", ROWS[1:], "csv")
    write(folder / "c_saved", ROWS, "saved")
    (folder / "README.txt").write_text("not data")
    assert is_natural_partition(folder) and not is_natural_partition(folder / "c_saved")
    files = natural_partition_files(folder)
    assert [p.name for p in files] == ["a_clinic.csv", "b_bank.parquet", "c_saved"]
    sizes = [len(read_text_classification(p, SCHEMA).dataset) for p in files]
    assert sizes == [2, 1, 3]
    assert np.sum(sizes) == len(ROWS) * 2
