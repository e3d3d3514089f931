"""Write this example's small data files from the vendored SST-2 training file.

Three files in three formats, each a different slice of ``data/sst2/train.tsv`` with the
labels written as names (``negative``/``positive``), as a real node's export would:

* ``silos/a_clinic.csv``    rows 0-599      (CSV)        -> client 0
* ``silos/b_bank.parquet``  rows 600-1199   (Parquet)    -> client 1
* ``eval.jsonl``            rows 1200-1599  (JSON Lines) -> an optional server evaluation file

Licence: the rows are SST-2's (Socher et al., EMNLP 2013, via GLUE); the SST release names
no explicit licence (dataset cards list it as "unknown"), use them for research. See
data/MANIFEST.md. Run from anywhere: ``python examples/own_data/make_files.py``.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / "data" / "sst2" / "train.tsv"
LABELS = ("negative", "positive")


def rows(start: int, stop: int) -> list[dict[str, str]]:
    with SOURCE.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        picked = [row for i, row in enumerate(reader) if start <= i < stop]
    return [{"sentence": r["sentence"].strip(), "label": LABELS[int(r["label"])]} for r in picked]


def atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from a container's user
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_csv(path: Path, data: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sentence", "label"])
        writer.writeheader()
        writer.writerows(data)


def main() -> None:
    atomic(HERE / "silos" / "a_clinic.csv", lambda p: write_csv(p, rows(0, 600)))
    atomic(HERE / "silos" / "b_bank.parquet", lambda p: pq.write_table(pa.Table.from_pylist(rows(600, 1200)), p))
    lines = "".join(json.dumps(r) + "\n" for r in rows(1200, 1600))
    atomic(HERE / "eval.jsonl", lambda p: p.write_text(lines, encoding="utf-8"))


if __name__ == "__main__":
    main()
