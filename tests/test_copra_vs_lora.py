"""The CopRA-vs-LoRA benchmark: its metric functions, and a --quick smoke run."""

from __future__ import annotations

import json
import re
import sys
import textwrap

import numpy as np
import pytest

from benchmarks.copra_vs_lora import barrier_at, merge_deficit
from copra_core.diagnostics import _barrier


def test_barrier_at_matches_the_chord_by_hand():
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    curve = [1.0, 1.4, 1.9, 1.7, 2.0]  # client j at alpha 0, client i at alpha 1
    chord = np.interp(0.5, [0.0, 1.0], [1.0, 2.0])
    assert barrier_at(curve, alphas, 0.5) == pytest.approx(1.9 - chord)
    assert barrier_at(curve, alphas, 0.0) == pytest.approx(0.0)
    # The maximum over the grid is the diagnostics' pairwise barrier.
    assert max(barrier_at(curve, alphas, a) for a in alphas) == pytest.approx(_barrier(curve, alphas, 2.0, 1.0))


def test_merge_deficit_is_weighted_mean_minus_merged():
    accuracies, weights = [0.9, 0.6, 0.75], [100, 300, 600]
    expected = np.average(accuracies, weights=weights) - 0.7
    assert merge_deficit(accuracies, weights, 0.7) == pytest.approx(expected)
    assert merge_deficit([0.5, 0.5], [1, 1], 0.8) == pytest.approx(-0.3)  # merging can help


def test_a_cache_of_another_config_is_refused_not_reused(tmp_path):
    """cached_runs returns a cache of the same config without running; another config's is an error."""
    from benchmarks.common import cached_runs, comparable_config
    from copra_core.config import RunConfig

    config = RunConfig.from_flat({"seed": 3, "train.local-steps": 7})
    cache = tmp_path / "run.json"
    cache.write_text(json.dumps({"seed": 3, "config": comparable_config(config), "rows": [{"round": 0}]}))
    assert cached_runs([(config, cache, {})], lambda key: True)[0]["rows"] == [{"round": 0}]
    changed = RunConfig.from_flat({"seed": 3, "train.local-steps": 8})
    with pytest.raises(ValueError, match=r"run\.json holds a run of another config \(keys \['train\.local-steps'\]"):
        cached_runs([(changed, cache, {})], lambda key: True)
    # A report over whatever is cached reads it anyway.
    assert cached_runs([(changed, cache, {})], lambda key: True, check_config=False)[0]["seed"] == 3
    cache.write_text(json.dumps({"seed": 3, "rows": []}))  # an old cache, without its config
    with pytest.raises(ValueError, match="written without its config"):
        cached_runs([(config, cache, {})], lambda key: True)


def test_cli_benchmark_names_unknown_benchmarks():
    from typer.testing import CliRunner

    from simulations.cli import app

    result = CliRunner().invoke(app, ["benchmark", "copra_vs_lora"])  # underscore: not the CLI name
    assert result.exit_code == 2
    assert "unknown benchmark 'copra_vs_lora'" in result.output and "copra-vs-lora" in result.output
    # The CLI name runs the benchmark module with the arguments that follow (its own --help here).
    result = CliRunner().invoke(app, ["benchmark", "copra-vs-lora", "--help"])
    assert result.exit_code == 0, result.output
    assert "usage: copra-fl benchmark copra-vs-lora" in result.output and "--quick" in result.output


#: ``--quick`` with 2 clients, smaller evaluation samples and a 3-point grid: this test checks
#: that every part of the pipeline runs and reports numbers, not what the numbers are.
SMOKE_RUN = textwrap.dedent(
    """
    import sys

    from benchmarks import copra_vs_lora

    copra_vs_lora.QUICK.update(
        {"federation.clients": 2, "data.eval-size": 32, "diagnostics.sample-size": 16, "diagnostics.grid": "0,0.5,1"}
    )
    sys.argv = ["copra-fl benchmark copra-vs-lora", *sys.argv[1:]]
    copra_vs_lora.main()
    """
)


@pytest.mark.e2e
def test_quick_benchmark_writes_tables_with_numbers(tmp_path):
    from tests.helpers import run_tagged

    out = tmp_path / "results"
    args = [sys.executable, "-c", SMOKE_RUN, "--quick", "--seeds", "0", "--out", str(out)]
    proc = run_tagged(args, tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in (
        "copra_vs_lora_quick.md",
        "copra_vs_lora_quick.json",
        "copra_vs_lora_quick_curves.png",
        "copra_vs_lora_quick_rounds.png",
    ):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "copra_vs_lora_quick.json").read_text())
    assert len(summary["one_shot"]) == 6  # 3 regimes x 2 methods on SST-2
    assert set(summary["multi_round"]) == {"copra/float32", "copra/float16", "lora/float32", "lora/float16"}
    # Barrier figures per round (2 quick rounds) from the float32 runs; the float16 runs skip them.
    assert len(summary["multi_round"]["copra/float32"]["barrier_max"]) == 2
    assert "barrier_max" not in summary["multi_round"]["copra/float16"]
    # fp16 transport halves the upload.
    up32 = summary["multi_round"]["lora/float32"]["bytes_up_per_client"]
    up16 = summary["multi_round"]["lora/float16"]["bytes_up_per_client"]
    assert up16 == pytest.approx(up32 / 2, rel=0.01)
    lines = (out / "copra_vs_lora_quick.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("| sst2 |")]
    assert len(table) == 6
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")][4:]
        assert all(re.fullmatch(r"-?\d+\.\d+", c.split(" ")[0]) for c in cells), line
    targets = [line for line in lines if line.startswith("| sst2/") or line.startswith("| multi-round")]
    assert targets and all(re.search(r"\| [-+]?\d+\.\d+ \||n/a", line) for line in targets), targets
