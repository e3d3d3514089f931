"""What the federation benchmarks share: one cached simulated run, and mean +- std."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from copra_core.config import RunConfig
from copra_core.reporting import atomic_write_text
from simulations.runner import simulate


def cached_run(config: RunConfig, cache: Path, keep: Callable[[str], bool], **labels: object) -> dict:
    """Run one simulated federation (same ServerApp/ClientApp as ``copra-fl simulate``), or read its cache.

    The per-round metric rows are kept for the keys ``keep`` accepts; the result is written
    as JSON to ``cache`` (atomically), so an interrupted benchmark resumes where it stopped.
    """
    if cache.exists():
        return json.loads(cache.read_text())
    with tempfile.TemporaryDirectory(prefix="copra-bench-") as tmp:
        config.out_dir = tmp
        started = time.perf_counter()
        simulate(config, observers=[lambda row: None])
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    result = {
        **labels,
        "seconds": time.perf_counter() - started,
        "rows": [{k: v for k, v in row.items() if keep(k)} for row in rows],
    }
    atomic_write_text(cache, json.dumps(result))
    return result


def mean_std(values: Iterable[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value: no spread was measured)."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def pm(pair: tuple[float, float | None] | None, digits: int = 3) -> str:
    """``mean ± std`` as text (``n/a`` for no value)."""
    if pair is None:
        return "n/a"
    return f"{pair[0]:.{digits}f}" + ("" if pair[1] is None else f" ± {pair[1]:.{digits}f}")
