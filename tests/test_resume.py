"""Checkpoints and resume: file format, config checks, stateful rules, and a real kill."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import strategies
from copra_core.checkpoint import (
    FILE_NAME,
    Checkpoint,
    CheckpointError,
    check_resumable,
    config_differences,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from copra_core.config import RunConfig
from strategies.base import ClientUpdate, StrategyContractError
from tests.processes import RunTag, alive, leftovers, pgrep, terminate

ROOT = Path(__file__).resolve().parents[1]


def _adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m.lora_A.weight": 0.1 * torch.randn(2, 6, generator=g),
        "m.lora_B.weight": 0.1 * torch.randn(6, 2, generator=g),
        "head.weight": torch.randn(3, 6, generator=g),
    }


def test_checkpoint_round_trip_and_rng(tmp_path):
    config = RunConfig().to_flat()
    tensors = {"global": _adapter(1), "rule": {"round": torch.tensor(3)}, "init_offsets": {}}
    rows = [{"round": 0, "global/accuracy": 0.5}, {"round": 1, "global/accuracy": float("nan")}]
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    server_state = {"allocation": {"modules": ["m"], "ranking": ["m", "n"], "params": 24, "scores": {"m": 0.5}}}
    save_checkpoint(tmp_path, Checkpoint(1, config, tensors, rows, server_state=server_state))
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # scramble
    loaded = load_checkpoint(tmp_path)
    assert loaded.round == 1 and loaded.config == config
    assert loaded.metrics[0] == rows[0] and np.isnan(loaded.metrics[1]["global/accuracy"])
    for key, value in tensors["global"].items():
        assert torch.equal(loaded.tensors["global"][key], value)
    assert int(loaded.tensors["rule"]["round"]) == 3 and loaded.tensors["rule_offsets"] == {}
    assert loaded.server_state == server_state
    restore_rng(loaded)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert not [p for p in tmp_path.iterdir() if p.name != FILE_NAME]  # no temporary file left


def test_missing_and_unreadable_checkpoints_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint\.safetensors does not exist"):
        load_checkpoint(tmp_path)
    (tmp_path / FILE_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match=r"cannot be read"):
        load_checkpoint(tmp_path)


def test_differing_config_is_refused_naming_the_keys(tmp_path):
    saved = RunConfig()
    current = RunConfig()
    current.train.lr = 0.5
    current.seed = 3
    current.out_dir = "elsewhere"  # may differ
    current.federation.resume = True  # may differ
    assert config_differences(saved.to_flat(), current.to_flat()) == ["seed", "train.lr"]
    save_checkpoint(tmp_path, Checkpoint(2, saved.to_flat(), {"global": _adapter(0)}))
    with pytest.raises(CheckpointError, match=r"seed \(0 -> 3\), train\.lr \(0\.005 -> 0\.5\)"):
        check_resumable(load_checkpoint(tmp_path), current.to_flat(), tmp_path / FILE_NAME)


@pytest.mark.parametrize(
    ("name", "options"), [("fedadam", ""), ("fedyogi", ""), ("dare", "density=0.5"), ("residual", ""), ("linear", "")]
)
def test_stateful_rules_continue_exactly_after_a_restart(name, options):
    """Rounds 1-4 in one rule object == rounds 1-2, state_dict, a fresh object, rounds 3-4."""

    def updates(r: int) -> list[ClientUpdate]:
        return [ClientUpdate(node_id=k, state=_adapter(100 * r + k), num_examples=10 + k) for k in range(3)]

    def run(rule, current, rounds):
        for r in rounds:
            current = rule.aggregate(updates(r), current)
        return current

    straight = strategies.build(name, options)
    expected = run(straight, _adapter(0), range(1, 5))
    first = strategies.build(name, options)
    halfway = run(first, _adapter(0), range(1, 3))
    state = {k: v.clone() for k, v in first.state_dict().items()}
    second = strategies.build(name, options)
    second.load_state_dict(state)
    resumed = run(second, halfway, range(3, 5))
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key
    for key, value in straight.base_offset().items():
        assert torch.equal(second.base_offset()[key], value)


def test_a_stateless_rule_refuses_foreign_state():
    with pytest.raises(StrategyContractError, match="keeps no state"):
        strategies.build("median", "").load_state_dict({"round": torch.tensor(1)})


# ---------------------------------------------------------------------- a real kill
def _env(ray_tmp: Path, tag: RunTag) -> dict[str, str]:
    # A TMPDIR of this test's own: Ray's session folder (and so its processes' command
    # lines) then name it, and a killed run's leftovers can be found and stopped. Short,
    # because Ray's socket paths must stay under 107 bytes.
    return tag.env(
        dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            TMPDIR=str(ray_tmp),
        )
    )


def _command(*extra: str) -> list[str]:
    quick = ["--quick", "--rounds", "4", "--set", "train.local-steps=25"]  # 25 steps: short rounds, same path
    # 2 of 4 clients per round: the straight and the resumed run (random node ids each)
    # must sample the same partitions every round (server/sampling.py).
    quick += ["--set", "federation.clients=4", "--set", "federation.fraction-train=0.5"]
    quick += ["--set", "federation.fraction-evaluate=0.5"]
    # HeteroLoRA allocation, re-scored every 3 rounds: the run is killed after round 2, so
    # the resumed round 3 must use the checkpointed allocation (without it the server
    # would score again before round 3) and round 4 re-scores as the straight run does. The plain path's resume is
    # covered by tests/test_deployment.py (a killed ServerApp).
    allocation = {"enabled": "true", "every-rounds": "3", "scoring-batches": "2", "client-ranks": "4,8,4,8"}
    quick += ["--strategy", "masked", *(x for k, v in allocation.items() for x in ("--set", f"allocation.{k}={v}"))]
    return [sys.executable, "-m", "simulations.cli", "simulate", *quick, "--no-display", *extra]


def _checkpoint_round(out: Path) -> int:
    try:
        with safe_open(str(out / FILE_NAME), framework="pt") as handle:
            return json.loads(handle.metadata()["copra-fl"])["round"]
    except Exception:  # not written yet, or being replaced this instant
        return -1


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timings = ("time/", "allocation/scoring_s")
    return [{k: v for k, v in row.items() if not k.startswith(timings)} for row in rows]


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    # Not under tmp_path: Ray's session socket paths below it must stay under 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="cr-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.e2e
def test_killed_run_resumes_to_the_same_adapter_and_metrics(tmp_path, ray_tmp):
    tag = RunTag()
    env = _env(ray_tmp, tag)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = subprocess.run(
        _command("--out", str(straight)), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    victim = subprocess.Popen(
        _command("--out", str(killed)),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 900
        while _checkpoint_round(killed) < 2 and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert victim.poll() is None, "the run ended before it could be killed"
        assert _checkpoint_round(killed) == 2
        os.killpg(victim.pid, signal.SIGKILL)  # a real kill: no handler, no clean-up
        victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
        # Ray's daemons run in their own sessions: stop the ones of this test's TMPDIR.
        terminate({p for p in pgrep(str(ray_tmp)) if alive(p)})
    assert not (killed / "adapter").exists()
    assert [r["round"] for r in _rows(killed)] in ([0, 1, 2], [0, 1, 2, 3])  # killed in round 3

    resumed = subprocess.run(
        _command("--resume", str(killed)), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _rows(killed) == _rows(straight)
    # Scored before rounds 1 and 4 only: round 3 ran on the allocation from the checkpoint.
    assert [r["round"] for r in _rows(straight) if "allocation/modules" in r] == [1, 4]
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise on CPU

    refused = subprocess.run(
        _command("--resume", str(killed), "--set", "train.lr=0.5"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2  # a configuration error
    assert "config differs from the checkpoint's in train.lr (0.01 -> 0.5)" in refused.stderr
    leaked = leftovers(tag.live)
    assert not leaked, f"processes left running: {leaked}"
