"""Vendored data, partitioning and bad-input errors."""

import hashlib
from pathlib import Path

import pytest

from copra_core import data
from copra_core.config import DataSettings

ROOT = Path(__file__).resolve().parents[1]


def test_vendored_files_match_checksums():
    for line in (ROOT / "data" / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((ROOT / "data" / name).read_bytes()).hexdigest() == digest, name


def test_sst2_shapes():
    spec = data.dataset_spec("sst2")
    train = data.read_split(data.REPO_DATA_DIR, spec, "train")
    dev = data.read_split(data.REPO_DATA_DIR, spec, "eval")
    assert (len(train), len(dev)) == (67349, 872)
    assert sum(dev["label"]) == 444


def test_mrpc_pairs_labels_and_bom():
    spec = data.dataset_spec("mrpc")
    train = data.read_split(data.REPO_DATA_DIR, spec, "train")
    dev = data.read_split(data.REPO_DATA_DIR, spec, "eval")
    assert (len(train), len(dev)) == (3668, 408)
    assert (sum(train["label"]), sum(dev["label"])) == (2474, 279)  # MANIFEST.md's counts
    # The byte-order mark is not part of the first column's name (utf-8-sig).
    assert train.column_names == ["#1 String", "#2 String", "label"]
    assert train[0]["#1 String"].startswith("Amrozi accused his brother")


def test_ag_news_fixed_held_out_split():
    spec = data.dataset_spec("ag_news")
    train = data.read_split(data.REPO_DATA_DIR, spec, "train")
    held_out = data.read_split(data.REPO_DATA_DIR, spec, "eval")
    assert (len(train), len(held_out)) == (6600, 1000)
    rows = lambda ds: set(zip(ds["title"], ds["description"], ds["label"], strict=True))  # noqa: E731
    assert not rows(train) & rows(held_out)  # disjoint
    # Labels are 0-based and every class keeps 1,900 rows over the two parts.
    for label in range(4):
        assert train["label"].count(label) + held_out["label"].count(label) == 1900
    # The split does not depend on the run's seed.
    again = data.server_eval_split(DataSettings(dataset="ag_news"), seed=5)
    assert list(again["title"]) == list(held_out["title"])


def test_missing_data_file_names_the_file_and_key(tmp_path):
    with pytest.raises(data.DataFileError, match=r"sst2/train\.tsv.*data\.dir"):
        data.client_splits(DataSettings(dir=str(tmp_path)), 0, 2, seed=0)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "pathological"])
def test_partitions_are_disjoint_and_deterministic(partition):
    settings = DataSettings(partition=partition, dirichlet_alpha=0.3)
    parts = [data.client_splits(settings, i, 3, seed=1) for i in range(3)]
    again = data.client_splits(settings, 1, 3, seed=1)
    assert list(again[0]["sentence"]) == list(parts[1][0]["sentence"])
    sizes = [len(tr) + len(va) for tr, va in parts]
    assert sum(sizes) <= 67349
    if partition == "iid":
        assert max(sizes) - min(sizes) <= 1
    if partition == "pathological":
        assert all(len(set(tr["label"])) == 1 for tr, _ in parts)
    if partition == "dirichlet":
        shares = [sum(tr["label"]) / len(tr) for tr, _ in parts]
        assert max(shares) - min(shares) > 0.1  # label skew


def test_unknown_dataset_and_partition_errors():
    with pytest.raises(ValueError, match=r"data\.dataset"):
        data.dataset_spec("imagenet")
    with pytest.raises(ValueError, match=r"data\.partition"):
        data.make_partitioner(DataSettings(partition="zipf"), 2, 0)


def test_lazy_encoding_matches_batch_tokenisation():
    """Client examples are encoded on access; they must equal the tokenizer's batch output."""
    from copra_core.config import RunConfig
    from copra_core.tasks.sequence_classification import SequenceClassificationTask, _tokenizer

    config = RunConfig.from_flat({"data.dataset": "mrpc", "model.max-length": 24, "federation.clients": 4})
    task = SequenceClassificationTask(config)
    train, _ = data.client_splits(config.data, 1, 4, config.seed)
    rows = train.select(range(40))
    lazy = task._encode(rows)
    batch = _tokenizer(task.model_path)(
        list(rows["#1 String"]), list(rows["#2 String"]), truncation=True, max_length=24
    )
    assert len(lazy) == 40
    assert [lazy[i]["input_ids"] for i in range(40)] == batch["input_ids"]
    assert [e["label"] for e in lazy[-3:]] == list(rows["label"])[-3:]
    assert max(len(ids) for ids in batch["input_ids"]) == 24  # truncation was exercised
    with pytest.raises(IndexError):
        lazy[40]
