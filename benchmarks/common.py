"""What the federation benchmarks share: one cached simulated run, and mean +- std."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from copra_core.checkpoint import config_differences
from copra_core.config import RunConfig
from copra_core.reporting import atomic_write_text
from simulations.runner import simulate_many


def cached_run(
    config: RunConfig, cache: Path, keep: Callable[[str], bool], check_config: bool = True, **labels: object
) -> dict:
    """One simulated federation (same ServerApp/ClientApp as ``copra-fl simulate``), or its cache."""
    return cached_runs([(config, cache, labels)], keep, check_config=check_config)[0]


def cached_runs(
    jobs: Sequence[tuple[RunConfig, Path, dict[str, object]]],
    keep: Callable[[str], bool],
    progress: Callable[[dict], None] = lambda result: None,
    check_config: bool = True,
) -> list[dict]:
    """Results of ``(config, cache file, labels)`` jobs, in order; the uncached ones run in one simulation.

    The runs without a cache go one after the other on the same simulated SuperNodes
    (``simulate_many``: the nodes start once). Each result keeps the per-round metric rows
    for the keys ``keep`` accepts and is written as JSON to its cache (atomically) as soon
    as its run ends, so an interrupted benchmark resumes where it stopped. ``seconds`` is
    the run's wall-clock time; the first run of a simulation includes the nodes' start.
    ``progress`` sees each result as it is finished. A cache holds its run's config: one
    written for another config (the benchmark's setting changed since) is an error naming
    the file, not a silently reused result; ``check_config=False`` (a report over whatever
    is cached) skips the check.
    """
    results: dict[Path, dict] = {}
    for config, cache, _ in jobs:
        cached = read_cache(cache, config, check_config)
        if cached is not None:
            results[cache] = cached
    todo = [(config, cache, labels) for config, cache, labels in jobs if cache not in results]
    if todo:
        with tempfile.TemporaryDirectory(prefix="copra-bench-") as tmp:
            by_out: dict[str, tuple[Path, dict[str, object]]] = {}
            for index, (config, cache, labels) in enumerate(todo):
                config.out_dir = str(Path(tmp) / f"run{index}")
                by_out[config.out_dir] = (cache, labels)
            clock = [time.perf_counter()]

            def finished(config: RunConfig) -> None:
                cache, labels = by_out[config.out_dir]
                rows = [json.loads(line) for line in (Path(config.out_dir) / "metrics.jsonl").read_text().splitlines()]
                now = time.perf_counter()
                result = {
                    **labels,
                    "config": comparable_config(config),
                    "seconds": now - clock[0],
                    "rows": [{k: v for k, v in row.items() if keep(k)} for row in rows],
                }
                clock[0] = now
                atomic_write_text(cache, json.dumps(result))
                results[cache] = result
                progress(result)

            simulate_many([config for config, _, _ in todo], observers=[lambda row: None], after_run=finished)
    return [results[cache] for _, cache, _ in jobs]


#: Keys a cached run may differ in and still be the same run.
CACHE_FREE_KEYS = frozenset({"out-dir"})


def comparable_config(config: RunConfig) -> dict:
    """The flat config a cache stores and is checked against (the output folder aside)."""
    return {k: v for k, v in config.to_flat().items() if k not in CACHE_FREE_KEYS}


def read_cache(cache: Path, config: RunConfig, check_config: bool = True) -> dict | None:
    """The result cached in ``cache`` (None if there is none), refused if another config wrote it."""
    if not cache.exists():
        return None
    result = json.loads(cache.read_text())
    if check_config:
        _check_cached_config(cache, result.get("config"), config)
    return result


def _check_cached_config(cache: Path, saved: dict | None, config: RunConfig) -> None:
    current = comparable_config(config)
    if saved is None:
        raise ValueError(f"{cache} was written without its config: move it away to run this setting again")
    differing = config_differences(saved, current, ignore=CACHE_FREE_KEYS)
    if differing:
        raise ValueError(
            f"{cache} holds a run of another config (keys {differing[:5]}): move it away to run this setting"
        )


def mean_std(values: Iterable[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value: no spread was measured)."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def pm(pair: tuple[float, float | None] | None, digits: int = 3) -> str:
    """``mean ± std`` as text (``n/a`` for no value)."""
    if pair is None:
        return "n/a"
    return f"{pair[0]:.{digits}f}" + ("" if pair[1] is None else f" ± {pair[1]:.{digits}f}")
