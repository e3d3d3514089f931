"""Start-up of a node with a large own file: time to its first batch and memory against the file's size.

Writes a CSV of ``--rows`` rows (synthetic sentences: this measures reading, not learning)
in a temporary folder, then, in a fresh Python process (so the memory figure is that of a
node, not of this script): reads and checks it (``copra_core.local_data``), splits off the
local validation rows as a client does, and tokenises the first training batch with the
default model's tokenizer. Prints the file size, the seconds per stage and the process's
peak resident memory above its resident memory after the imports.

Usage: python -m benchmarks.local_data [--rows 1000000] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [
    "the",
    "a",
    "film",
    "movie",
    "plot",
    "actor",
    "scene",
    "good",
    "bad",
    "dull",
    "bright",
    "slow",
    "fast",
    "story",
    "ending",
    "music",
    "long",
    "short",
]


def write_csv(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        handle.write("text,label\n")
        for _ in range(rows):
            sentence = " ".join(rng.choices(WORDS, k=rng.randint(5, 20)))
            handle.write(f"{sentence},{rng.choice(('negative', 'positive'))}\n")


def measure(path: str, batch: int) -> dict:
    """Runs in the child process."""
    import resource

    import psutil
    from transformers import AutoTokenizer

    from copra_core.local_data import TextSchema, read_text_classification
    from copra_core.model_loading import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("default"))
    baseline = psutil.Process().memory_info().rss
    started = time.perf_counter()
    result = read_text_classification(Path(path), TextSchema(("text",), "label", ("negative", "positive")))
    read_s = time.perf_counter() - started
    split = result.dataset.train_test_split(test_size=0.1, seed=0)
    split_s = time.perf_counter() - started - read_s
    train = split["train"]
    texts = list(train.select(range(batch))["text"])
    encoded = tokenizer(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
    first_batch_s = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    return {
        "rows": len(result.dataset),
        "train_rows": len(train),
        "batch_shape": list(encoded["input_ids"].shape),
        "read_s": read_s,
        "split_s": split_s,
        "first_batch_s": first_batch_s,
        "rss_after_imports_mb": baseline / 2**20,
        "peak_rss_mb": peak / 2**20,
        "peak_above_imports_mb": (peak - baseline) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch)))
        return
    with tempfile.TemporaryDirectory(prefix="copra-local-data-") as tmp:
        path = Path(tmp) / "node.csv"
        write_csv(path, args.rows)
        size_mb = path.stat().st_size / 2**20
        child = [sys.executable, "-m", "benchmarks.local_data", "--child", str(path), "--batch", str(args.batch)]
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"measuring child failed:\n{done.stderr}")
        out = done.stdout
        figures = json.loads(out.strip().splitlines()[-1])
    print(f"file: {args.rows:,} rows, {size_mb:.1f} MB CSV")
    print(
        f"read+check {figures['read_s']:.2f} s, split {figures['split_s']:.2f} s, "
        f"first batch of {args.batch} tokenised after {figures['first_batch_s']:.2f} s"
    )
    print(
        f"peak RSS {figures['peak_rss_mb']:.0f} MB, of which {figures['peak_above_imports_mb']:.0f} MB above the "
        f"{figures['rss_after_imports_mb']:.0f} MB after imports: {figures['peak_above_imports_mb'] / size_mb:.2f}x "
        "the file's size"
    )


if __name__ == "__main__":
    main()
