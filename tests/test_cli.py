"""``copra-fl simulate``'s handling of configuration errors and of the output folder, in-process.

Everything here stops before Flower starts: a configuration error exits with status 2
(message on stderr, no traceback), and the happy paths hand the resolved config to a
stand-in for the simulation runner. One test runs the installed ``copra-fl`` entry point.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import simulations.runner
from copra_core.checkpoint import RUN_OUTPUTS, Checkpoint, prepare_out_dir, save_checkpoint
from copra_core.config import ConfigError, RunConfig
from simulations.cli import app
from simulations.scenarios import scenario_config


def invoke(*args: str):
    """``copra-fl ARGS`` in this process; exceptions other than the CLI's own exits propagate."""
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def runs(monkeypatch) -> list[RunConfig]:
    """The configs ``copra-fl simulate`` would run; the simulation itself is replaced."""
    started: list[RunConfig] = []

    def fake_simulate(config: RunConfig, observers=(), verbose=False) -> Path:
        started.append(config)
        return Path(config.out_dir)

    monkeypatch.setattr(simulations.runner, "simulate", fake_simulate)
    return started


def _finished_run(folder: Path) -> None:
    """What a finished run leaves (a few of RUN_OUTPUTS), next to a file of the user's."""
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n{"round": 2}\n')
    (folder / "base_offset.safetensors").write_bytes(b"offsets")
    (folder / "notes.txt").write_text("mine")


# ---------------------------------------------------------------------- configuration errors: exit 2
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "lora.r=0"], "Config key 'lora.r' must be > 0, got 0."),
        (["--set", "lora.rank=4"], "Unknown config key 'lora.rank'. Did you mean: lora.r"),
        (["--set", "data.partition=zipf"], "Config key 'data.partition' must be one of iid | dirichlet"),
        (["--strategy", "nope"], "Config key 'strategy.name': unknown strategy 'nope'"),
        (["--strategy", "linear", "--strategy-options", "trim=1"], "strategy LinearAveraging has no option"),
        (["--partition", "zipf"], "Invalid value for '--partition'"),  # choices from the Literal (click)
        (["--method", "qlora"], "Invalid value for '--method'"),
        (["--set", "federation.resume=true", "--overwrite"], "Config key 'federation.overwrite'"),
    ],
)
def test_a_configuration_error_exits_2_naming_it(tmp_path, runs, args, message):
    result = invoke("simulate", "--quick", "--out", str(tmp_path / "run"), "--no-display", *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split()), result.stderr  # rich wraps click's usage errors
    assert "Traceback" not in result.output and not runs
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_config_error_raised_during_the_run_exits_2_and_other_failures_1(tmp_path, monkeypatch):
    def failing(exc: Exception):
        def run(config, observers=(), verbose=False):
            raise exc

        return run

    monkeypatch.setattr(simulations.runner, "simulate", failing(ConfigError("Config key 'device': no such GPU")))
    result = invoke("simulate", "--quick", "--out", str(tmp_path / "a"), "--no-display")
    assert result.exit_code == 2 and "error: Config key 'device': no such GPU" in result.stderr
    monkeypatch.setattr(simulations.runner, "simulate", failing(RuntimeError("round 3 failed")))
    result = invoke("simulate", "--quick", "--out", str(tmp_path / "b"), "--no-display")
    assert result.exit_code == 1 and "error: RuntimeError: round 3 failed" in result.stderr


# ---------------------------------------------------------------------- resume
def _checkpointed(folder: Path) -> RunConfig:
    """A folder with the checkpoint of a ``--quick`` run after round 2, as the server writes it."""
    config = scenario_config("quick")
    config.out_dir = str(folder)
    folder.mkdir()
    save_checkpoint(folder, Checkpoint(2, config.to_flat(), {"global": {"m.lora_A.weight": torch.zeros(2, 3)}}))
    (folder / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n{"round": 2}\n')
    return config


def test_resume_with_the_checkpoints_config_starts(tmp_path, runs):
    folder = tmp_path / "run"
    saved = _checkpointed(folder)
    result = invoke("simulate", "--quick", "--resume", str(folder), "--no-display")
    assert result.exit_code == 0, result.output
    [config] = runs
    assert config.federation.resume and config.to_flat() == {**saved.to_flat(), "federation.resume": True}
    assert (folder / "metrics.jsonl").exists()  # a resumed run keeps its rows


def test_resume_with_another_config_exits_2_naming_the_key(tmp_path, runs):
    folder = tmp_path / "run"
    _checkpointed(folder)
    result = invoke("simulate", "--quick", "--resume", str(folder), "--set", "train.lr=0.5", "--no-display")
    assert result.exit_code == 2, result.output
    assert "the config differs from the checkpoint's in train.lr (0.01 -> 0.5)" in result.stderr
    assert not runs and "Traceback" not in result.output


def test_resume_without_a_checkpoint_exits_2(tmp_path, runs):
    result = invoke("simulate", "--quick", "--resume", str(tmp_path), "--no-display")
    assert result.exit_code == 2 and "No checkpoint to resume from" in result.stderr
    assert not runs


# ---------------------------------------------------------------------- an out-dir that holds a run
def test_an_out_dir_holding_a_run_is_refused_naming_it_and_the_ways_out(tmp_path, runs):
    folder = tmp_path / "run"
    _finished_run(folder)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    result = invoke("simulate", "--quick", "--out", str(folder), "--no-display")
    assert result.exit_code == 2, result.output
    stderr = " ".join(result.stderr.split())
    assert f"{folder} already holds a run (metrics.jsonl, adapter, base_offset.safetensors)" in stderr
    assert f"--resume {folder}" in stderr and "--overwrite" in stderr
    assert not runs
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # untouched


def test_overwrite_removes_the_previous_run_and_starts(tmp_path, runs):
    folder = tmp_path / "run"
    _finished_run(folder)
    result = invoke("simulate", "--quick", "--out", str(folder), "--overwrite", "--no-display")
    assert result.exit_code == 0, result.output
    [config] = runs
    assert config.federation.overwrite and not config.federation.resume
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]  # the old run's outputs only


def test_overwrite_removes_nothing_when_the_config_is_wrong(tmp_path, runs):
    folder = tmp_path / "run"
    _finished_run(folder)
    result = invoke("simulate", "--quick", "--out", str(folder), "--overwrite", "--strategy", "nope", "--no-display")
    assert result.exit_code == 2 and not runs
    assert (folder / "metrics.jsonl").exists() and (folder / "adapter").is_dir()


def test_an_empty_or_new_out_dir_needs_no_flag(tmp_path, runs):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for name in ("empty", "new", "other"):
        result = invoke("simulate", "--quick", "--out", str(tmp_path / name), "--no-display")
        assert result.exit_code == 0, result.output
    assert [Path(c.out_dir).name for c in runs] == ["empty", "new", "other"]
    assert (tmp_path / "new").is_dir()


@pytest.mark.parametrize("name", RUN_OUTPUTS)
def test_prepare_out_dir_treats_every_run_output_as_a_run(tmp_path, name):
    (tmp_path / name).write_text("x")
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_out_dir(tmp_path, resume=False, overwrite=False)
    prepare_out_dir(tmp_path, resume=True, overwrite=False)  # a resumed run continues it
    assert (tmp_path / name).exists()
    prepare_out_dir(tmp_path, resume=False, overwrite=True)
    assert not (tmp_path / name).exists()


def test_prepare_out_dir_refuses_a_file(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        prepare_out_dir(tmp_path / "run", resume=False, overwrite=True)


# ---------------------------------------------------------------------- the installed entry point
def test_the_copra_fl_entry_point_exits_2_on_a_configuration_error(tmp_path):
    copra_fl = Path(sys.executable).with_name("copra-fl")
    proc = subprocess.run(
        [str(copra_fl), "simulate", "--quick", "--out", str(tmp_path / "run"), "--set", "lora.r=0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "error: Config key 'lora.r' must be > 0, got 0."
    assert not (tmp_path / "run").exists()
