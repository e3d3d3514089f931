"""The three ways to bring a strategy, and every built-in rule, through Flower's simulation.

The example plug-in (``examples/custom_strategy``) is "installed" by writing its
dist-info (what ``pip install`` writes: METADATA + entry_points.txt) into a temporary
folder on the path, so entry-point discovery runs exactly as for a pip-installed package
without touching the environment.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import strategies
from copra_core.config import ConfigError
from strategies.base import ClientUpdate, StrategyContractError
from strategies.linear import LinearAveraging
from tests.helpers import exported_accuracy, run_tagged

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_strategy"


def _install_dist_info(site: Path, entry_points: str) -> None:
    dist = site / "copra_example_strategy-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: copra-example-strategy\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(entry_points)


def _entry_points_of_example() -> str:
    """The example's pyproject entry points, as pip would write them to entry_points.txt."""
    import tomllib

    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    lines = ["[copra_fl.strategies]"]
    lines += [f"{name} = {target}" for name, target in project["entry-points"]["copra_fl.strategies"].items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def installed_example(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _install_dist_info(site, _entry_points_of_example())
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(site))
    return site


def test_entry_point_plugin_is_found_by_name(installed_example):
    from copra_example_strategy.rules import GeometricMedian

    assert "geometric_median" in strategies.available()
    rule = strategies.build("geometric_median", "iterations=6")
    assert isinstance(rule, GeometricMedian) and rule.iterations == 6
    with pytest.raises(ConfigError, match=r"has no option 'rounds' \(its options: \['eps', 'iterations'\]\)"):
        strategies.build("geometric_median", "rounds=3")


def test_cli_lists_builtins_and_plugins_with_their_options(installed_example):
    from typer.testing import CliRunner

    from simulations.cli import app

    result = CliRunner().invoke(app, ["strategies"])
    assert result.exit_code == 0, result.output
    for name in [*strategies.BUILTIN, "geometric_median"]:
        assert f"\n{name}\n" in f"\n{result.output}", name
    assert "Options: trim-fraction=0.2." in result.output
    assert "Options: iterations=4, eps=1e-06." in result.output


def test_broken_plugin_names_itself(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _install_dist_info(site, "[copra_fl.strategies]\nbroken = no_such_package.rules:Rule\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(StrategyContractError, match=r"plug-in 'broken' \(no_such_package.rules:Rule\) failed to load"):
        strategies.build("broken")


def test_geometric_median_example_minimises_the_sum_of_distances(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from copra_example_strategy.rules import GeometricMedian

    g = torch.Generator().manual_seed(0)
    current = {"m.lora_A.weight": torch.zeros(2, 3), "m.lora_B.weight": torch.zeros(3, 2)}
    updates = [
        ClientUpdate(i, {k: torch.randn(v.shape, generator=g) for k, v in current.items()}, num_examples=1)
        for i in range(5)
    ]
    updates.append(ClientUpdate(9, {k: v + 100.0 for k, v in current.items()}, num_examples=1))  # an outlier
    out = GeometricMedian(iterations=50).aggregate(updates, current)
    points = np.stack([np.concatenate([u.state[k].numpy().ravel() for k in current]) for u in updates])
    found = np.concatenate([out[k].numpy().ravel() for k in current])

    def objective(x: np.ndarray) -> float:
        return float(np.linalg.norm(points - x, axis=1).sum())

    rng = np.random.default_rng(0)
    assert all(objective(found) <= objective(found + 1e-2 * rng.standard_normal(found.shape)) for _ in range(50))
    assert objective(found) < objective(points.mean(0))
    assert np.abs(found).max() < 5  # the outlier at +100 does not drag it away


# ---------------------------------------------------------------------- through Flower
class RecordsInputKind(LinearAveraging):
    """Linear averaging that reports whether the server handed it a stream or a list."""

    def aggregate(self, updates, current):
        self.streamed = not isinstance(updates, (list, tuple))
        counted = []
        out = super().aggregate((counted.append(u) or u for u in updates), current)
        self.clients = len(counted)
        return out

    def round_metrics(self):
        return {"streamed": float(self.streamed), "clients": float(self.clients)}


RULES_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from simulations.runner import simulate_many
    from tests.helpers import tiny_config

    out = Path(sys.argv[1])
    configs = []
    for index, (spec, options, extra) in enumerate(json.loads(sys.argv[2])):
        config = tiny_config(**{
            "federation.clients": 3, "federation.rounds": 2, "federation.fraction-evaluate": 0.0,
            "model.max-length": 32, "data.eval-size": 32, "diagnostics.sample-size": 16,
            "diagnostics.grid": "0,0.5,1", "strategy.name": spec, "strategy.options": options, **extra,
        })
        config.out_dir = str(out / f"{index:02d}-{spec.replace(':', '_')}")
        configs.append(config)
    # One simulation, the runs one after the other on the same nodes (each is a whole run).
    simulate_many(configs, observers=[lambda row: None], after_run=lambda c: print("done", c.out_dir, flush=True))
    """
)


@pytest.mark.e2e
def test_every_rule_and_plugin_path_runs_through_flower(tmp_path):
    site = tmp_path / "site"
    _install_dist_info(site, _entry_points_of_example())
    specs = [[name, "", {}] for name in ["linear", *sorted(set(strategies.BUILTIN) - {"linear"})]]
    # The plug-in by entry-point name; a rule by dotted path (the same loader serves any module:Class).
    specs += [["geometric_median", "iterations=3", {}]]
    specs += [["tests.test_plugins:RecordsInputKind", "", {"diagnostics.enabled": False}]]
    # linear again at the end: after every other rule (base offsets, frozen A, ...) on the
    # same nodes it must compute exactly what it computed first, on fresh nodes.
    specs += [["linear", "", {}]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(EXAMPLE)]))
    proc = run_tagged(
        [sys.executable, "-c", RULES_SCRIPT, str(tmp_path / "runs"), json.dumps(specs)], tmp_path, 1200, env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    runs = [tmp_path / "runs" / f"{index:02d}-{spec.replace(':', '_')}" for index, (spec, _, _) in enumerate(specs)]
    for run, (spec, _, _) in zip(runs, specs, strict=True):
        check_run(run, spec)
    first, last = (_untimed_rows(runs[i]) for i in (0, -1))
    assert first == last


def _untimed_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


#: Rules whose output differs from the example-weighted factor average of 3 clients.
NOT_THE_FACTOR_AVERAGE = {
    "median",
    "norm_clip",
    "ties",
    "dare",
    "fedadam",
    "fedyogi",
    "product_svd",
    "residual",
    "geometric_median",
    "lora_fair",
    "flora",
}


def check_run(run: Path, spec: str) -> None:
    """What every rule's run must show, and what is particular to some rules."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2], spec
    config = json.loads((run / "config.json").read_text())
    assert config["strategy.name"] == spec  # config.json: flat keys
    if spec.endswith("RecordsInputKind"):
        # Diagnostics off and a single-pass rule: the server streamed the replies.
        assert all(r["strategy/streamed"] == 1.0 and r["strategy/clients"] == 3 for r in rows[1:])
        return
    for row in rows[1:]:
        assert np.isfinite(row["global/accuracy"]) and np.isfinite(row["barrier/jensen_aggregate"]), spec
        assert np.isfinite(row["aggregation/aggregate_error"]), spec
        if spec in NOT_THE_FACTOR_AVERAGE:
            # The diagnostics measured this rule's own output, not the factor average in its place.
            assert row["aggregation/aggregate_error"] != pytest.approx(row["aggregation/exactness_error"], rel=1e-3)
    if spec == "ffa":
        # Clients really froze A: the aggregate is exact and config.json says why.
        assert config["lora.freeze-a"] is True
        assert all(r["aggregation/aggregate_error"] < 1e-5 for r in rows[1:])
        assert all(r["aggregation/exactness_error"] < 1e-5 for r in rows[1:])
    if spec == "residual":
        # Exact in product space once the base offset is counted; every client had the same base;
        # the exported adapter plus base_offset.safetensors is the evaluated model.
        assert all(r["aggregation/aggregate_error"] < 1e-5 for r in rows[1:])
        assert all(r["aggregation/exactness_error"] > 1e-3 for r in rows[1:])  # factor averaging alone is not
        assert [r.get("clients/distinct_bases") for r in rows[1:]] == [None, 1]  # round 1: no offset yet
        assert rows[2]["comm/bytes_down"] > 3 * rows[1]["comm/bytes_down"]  # the offset travels
        assert exported_accuracy(run) == pytest.approx(rows[-1]["global/accuracy"], abs=1e-12)
    if spec == "flora":
        # The clients' exact average merged into the base, a fresh adapter (B = 0) each round.
        assert all(r["aggregation/aggregate_error"] < 1e-5 < r["aggregation/exactness_error"] for r in rows[1:])
        assert [r.get("clients/distinct_bases") for r in rows[1:]] == [None, 1]  # round 1: no offset yet
        assert rows[2]["comm/bytes_down"] > 3 * rows[1]["comm/bytes_down"]  # the offset travels
        assert exported_accuracy(run) == pytest.approx(rows[-1]["global/accuracy"], abs=1e-12)
    if spec == "lora_fair":
        assert all(r["strategy/correction_norm"] > 0 for r in rows[1:])
        assert all(r["aggregation/aggregate_error"] < r["aggregation/exactness_error"] for r in rows[1:])
    if spec == "fedrot":
        assert all(r["strategy/rotation_distance"] > 0 for r in rows[1:])  # the clients were rotated
    if spec == "product_svd":
        assert all(0 <= r["strategy/truncation_error"] < 1 for r in rows[1:])
        assert all(r["aggregation/aggregate_error"] < r["aggregation/exactness_error"] for r in rows[1:])
    if spec == "linear":
        assert all(
            r["aggregation/aggregate_error"] == pytest.approx(r["aggregation/exactness_error"], rel=1e-4)
            for r in rows[1:]
        )
    if "geometric_median" in spec.lower():
        assert all(r["strategy/max_over_median_distance"] >= 1 for r in rows[1:])
