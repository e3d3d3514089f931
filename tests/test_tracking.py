"""Experiment tracking: what each backend wrote, read back with its own library's reader.

One Flower simulation (a subprocess, as the other end-to-end tests) runs two 2-round
federations on the same nodes: one tracked by TensorBoard, MLflow and W&B (offline) behind
a backend that raises on every call, one without tracking. The tracked run's metrics.jsonl
must equal the untracked one's (the failing backend warned once and changed nothing), and
every backend must hold the values metrics.jsonl holds.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from copra_core.config import ConfigError, RunConfig
from copra_core.tracking import Tracker, Trackers, TrackingWarning, open_trackers, round_scalars
from copra_core.tracking.base import RunInfo
from tests.helpers import tiny_config
from tests.processes import RunTag, alive, leftovers, pgrep

ROOT = Path(__file__).resolve().parents[1]
RAISING = "tests.test_tracking:RaisingTracker"


class RaisingTracker(Tracker):
    """A backend whose every call fails as a full disk would; it records what was attempted."""

    name = "raising"
    calls: ClassVar[list[str]] = []

    def _fail(self, what: str) -> None:
        RaisingTracker.calls.append(what)
        raise OSError(28, "No space left on device")

    def log_scalars(self, step, scalars):
        self._fail("log_scalars")

    def log_image(self, step, name, image):
        self._fail("log_image")

    def log_artifacts(self, out_dir):
        self._fail("log_artifacts")

    def close(self, failed=False):
        self._fail("close")


class RecordingTracker(Tracker):
    """A backend that keeps every call."""

    name = "recording"

    def __init__(self, run: RunInfo) -> None:
        super().__init__(run)
        self.calls: list[tuple] = []

    def log_scalars(self, step, scalars):
        self.calls.append(("log_scalars", step, dict(scalars)))

    def log_image(self, step, name, image):
        self.calls.append(("log_image", step, name, image.shape))

    def log_artifacts(self, out_dir):
        self.calls.append(("log_artifacts", out_dir))

    def close(self, failed=False):
        self.calls.append(("close", failed))


class FailsToOpen(Tracker):
    """A backend whose store cannot be reached."""

    name = "unreachable"

    def __init__(self, run: RunInfo) -> None:
        raise ConnectionError("http://127.0.0.1:9 refused the connection")

    def log_scalars(self, step, scalars): ...

    def log_image(self, step, name, image): ...

    def close(self, failed=False): ...


@pytest.fixture(autouse=True)
def _wandb_home(tmp_path_factory, monkeypatch):
    """W&B keeps caches and settings under $HOME by default: keep them in pytest's folders."""
    home = tmp_path_factory.mktemp("wandb-home")
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))


def _row(round_: int) -> dict:
    return {
        "round": round_,
        "global/accuracy": 0.5 + round_ / 10,
        "global/loss": float("nan"),  # metrics.jsonl: null, not a value
        "comm/bytes_up": np.int64(1234),
        "clients": [{"partition-id": 3, "num-examples": 10, "loss": 0.25}],
        "curves": [{"pair": [0, 1], "alphas": [0.0, 0.5, 1.0], "loss_factor": [1, 2, 1], "loss_product": [1, 1, 1]}],
    }


def test_round_scalars_keys_values_as_in_metrics_jsonl():
    assert round_scalars(_row(1)) == {
        "global/accuracy": 0.6,
        "comm/bytes_up": 1234.0,
        "clients/3/num-examples": 10.0,
        "clients/3/loss": 0.25,
    }


def test_a_failing_backend_warns_once_and_the_others_go_on(tmp_path):
    RaisingTracker.calls.clear()
    run = RunInfo(name="r", out_dir=tmp_path, params={}, tags={})
    recording = RecordingTracker(run)
    trackers = Trackers([RaisingTracker(run), recording])
    with pytest.warns(TrackingWarning) as caught:
        trackers.on_round(_row(0))
        trackers.on_round(_row(1))
        trackers.on_end(tmp_path)
        trackers.close()
    assert len(caught) == 1
    assert "'raising' failed in log_scalars" in str(caught[0].message)
    assert "No space left on device" in str(caught[0].message)
    assert RaisingTracker.calls == ["log_scalars", "close"]  # closed once, quietly, then never called again
    assert [call[0] for call in recording.calls] == [
        "log_scalars",
        "log_image",
        "log_scalars",
        "log_image",
        "log_artifacts",
        "close",
    ]
    assert recording.calls[1][3][2] == 3  # an RGB image of the curves


def test_a_backend_that_cannot_open_is_left_out_with_a_warning(tmp_path):
    config = RunConfig.from_flat({"tracking.backends": "tests.test_tracking:FailsToOpen", "out-dir": str(tmp_path)})
    with pytest.warns(TrackingWarning, match="could not open its run .*refused the connection"):
        trackers = open_trackers(config)
    assert not trackers
    trackers.on_round(_row(1))  # nothing to call, nothing raised


@pytest.mark.parametrize(
    ("backend", "library"), [("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb")]
)
def test_a_missing_library_is_a_config_error_naming_the_extra(monkeypatch, tmp_path, backend, library):
    monkeypatch.setitem(sys.modules, library, None)  # `import library` now raises ImportError
    # Listed after an available backend: that one must not have been opened when the error comes.
    backends = backend if backend == "tensorboard" else f"tensorboard,{backend}"
    config = RunConfig.from_flat({"tracking.backends": backends, "out-dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=rf"tracking.backends.*'{backend}' needs the '{library}' package") as err:
        open_trackers(config)
    assert "pip install 'copra-fl[tracking]'" in str(err.value)
    assert not any(tmp_path.iterdir())  # nothing opened before the error


def test_unknown_backend_and_repeated_backend_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown backend 'tensorbord'.*Did you mean tensorboard"):
        open_trackers(RunConfig.from_flat({"tracking.backends": "tensorbord"}))
    with pytest.raises(ConfigError, match="'mlflow' is listed twice"):
        open_trackers(RunConfig.from_flat({"tracking.backends": "mlflow, mlflow"}))


def test_cli_track_option_checks_backends_before_starting(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from simulations.cli import app

    monkeypatch.setitem(sys.modules, "mlflow", None)
    result = CliRunner().invoke(app, ["simulate", "--quick", "--out", str(tmp_path / "run"), "--track", "mlflow"])
    assert result.exit_code == 2, result.output
    assert "copra-fl[tracking]" in result.output
    assert not (tmp_path / "run").exists()


def test_tracking_keys_refuse_neither_a_resume_nor_a_committed_benchmark_cache():
    from benchmarks.common import read_cache
    from copra_core.checkpoint import config_differences

    cache = ROOT / "docs" / "results" / "heterolora_raw" / "mrpc-full_r8-seed0.json"
    saved = json.loads(cache.read_text())["config"]  # written before the tracking keys existed
    assert not any(key.startswith("tracking.") for key in saved)
    tracked = RunConfig.from_flat(saved)
    tracked.update({"tracking.backends": "tensorboard,mlflow", "tracking.mlflow-uri": "http://127.0.0.1:5000"})
    assert read_cache(cache, tracked)["config"] == saved
    assert config_differences(saved, tracked.to_flat()) == []  # the resume check's comparison
    tracked.update({"seed": saved["seed"] + 1})  # a key that changes results still counts
    assert config_differences(saved, tracked.to_flat()) == ["seed"]
    with pytest.raises(ValueError, match="holds a run of another config"):
        read_cache(cache, tracked)


# ---------------------------------------------------------------------- through Flower
SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    from pathlib import Path
    from copra_core.tracking import TrackingWarning
    from simulations.runner import simulate_many
    from tests.test_tracking import RaisingTracker, run_configs

    out = Path(sys.argv[1])
    configs = run_configs(out)
    # The server opens each run's trackers from its config (tracking.backends), as in any run.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TrackingWarning)
        simulate_many(configs)
    warned = [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]
    (out / "result.json").write_text(json.dumps({"warnings": warned, "raising_calls": RaisingTracker.calls}))
    """
)


#: The tracked run: a failing backend first (the others must not notice), then the three.
BACKENDS = f"{RAISING},tensorboard,mlflow,wandb"


def run_configs(out: Path) -> list[RunConfig]:
    """The tracked run and the same run untracked (2 rounds of the tiny setting)."""
    common = {"federation.rounds": 2, "diagnostics.grid": "0,0.5,1", "data.eval-size": 64}
    return [
        tiny_config(**common, **{"out-dir": str(out / "tracked"), "tracking.backends": BACKENDS}),
        tiny_config(**common, **{"out-dir": str(out / "plain")}),
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracking")
    home = tmp / "wandb-home"
    tag = RunTag()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **{name: str(home / name.lower()) for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")},
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp)],
        cwd=tmp,
        env=tag.env(env),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    leaked = leftovers(lambda: tag.live() | {p for p in pgrep("wandb-core") if alive(p) and tag.carries(p)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert not leaked, f"processes left running: {leaked}"
    return tmp, json.loads((tmp / "result.json").read_text())


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _expected_series(rows: list[dict]) -> dict[str, dict[int, float]]:
    """Every number of metrics.jsonl by key and round; per-client values as clients/<partition-id>/<key>."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        entries = [(key, value) for key, value in row.items() if key != "round"]
        for client in row.get("clients", []):
            entries += [(f"clients/{client['partition-id']}/{k}", v) for k, v in client.items() if k != "partition-id"]
        for key, value in entries:
            if isinstance(value, (int, float)):  # null (not measured) and lists are not series
                series[key][row["round"]] = float(value)
    return series


@pytest.mark.e2e
def test_failing_tracker_warns_once_and_leaves_metrics_identical(runs):
    tmp, result = runs
    assert result["raising_calls"] == ["log_scalars", "close"]
    assert len(result["warnings"]) == 1 and "'raising' failed in log_scalars" in result["warnings"][0]

    def untimed(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]

    tracked, plain = _rows(tmp / "tracked"), _rows(tmp / "plain")
    assert [row["round"] for row in tracked] == [0, 1, 2]
    assert untimed(tracked) == untimed(plain)


@pytest.mark.e2e
def test_tensorboard_event_files_hold_the_metrics(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _ = runs
    expected = _expected_series(_rows(tmp / "tracked"))
    events = EventAccumulator(str(tmp / "tracked" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, by_round in expected.items():
        logged = {event.step: event.value for event in events.Scalars(key)}
        assert logged.keys() == by_round.keys(), key
        for step, value in by_round.items():  # TensorBoard stores float32
            assert math.isclose(logged[step], value, rel_tol=1e-6, abs_tol=1e-30), (key, step)
    assert "clients/0/loss" in expected and "barrier/jensen_factor" in expected
    assert [image.step for image in events.Images("curves/interpolation")] == [1, 2]
    texts = {tag.split("/")[0] for tag in events.Tags()["tensors"]}
    assert {"config", "tags", "report"} <= texts


@pytest.mark.e2e
def test_mlflow_run_holds_metrics_params_tags_and_artifacts(runs, tmp_path):
    from mlflow.tracking import MlflowClient

    tmp, _ = runs
    out = tmp / "tracked"
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("copra-fl")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    tracked = run_configs(tmp)[0]
    assert run.data.params == {key: str(value) for key, value in tracked.to_flat().items()}
    assert run.data.params["tracking.backends"] == BACKENDS
    assert {k: run.data.tags[k] for k in ("method", "strategy", "task", "dataset")} == {
        "method": "copra",
        "strategy": "linear",
        "task": "sequence_classification",
        "dataset": "sst2",
    }
    expected = _expected_series(_rows(out))
    assert set(run.data.metrics) == set(expected)
    for key, by_round in expected.items():
        assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} == by_round, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "accuracy.png", "barriers.png", "interpolation.png", "adapter", "curves"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "curves")} == {
        "curves/interpolation_round_001.png",
        "curves/interpolation_round_002.png",
    }
    adapter = Path(client.download_artifacts(run.info.run_id, "adapter", str(tmp_path)))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (adapter / name).read_bytes() == (out / "adapter" / name).read_bytes()


def _wandb_records(path: Path) -> list:
    """The records of an offline run's .wandb file, parsed with W&B's own protobuf schema.

    wandb >= 0.2x no longer ships a Python reader (its Go core reads the file), so the
    container is read here: W&B's 7-byte header, then LevelDB's log format (32 KiB blocks of
    chunks: CRC32C, little-endian length, type 1 full / 2 first / 3 middle / 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32 * 1024
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
        elif kind == 0:  # zero padding at the end of a block
            pending = b""
    return records


@pytest.mark.e2e
def test_wandb_offline_run_holds_history_config_and_tags(runs):
    tmp, _ = runs
    out = tmp / "tracked"
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    records = _wandb_records(next(run_dir.glob("run-*.wandb")))
    kinds = [record.WhichOneof("record_type") for record in records]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "copra-fl" and run.display_name == "tracked"
    assert set(run.tags) == {"method:copra", "strategy:linear", "task:sequence_classification", "dataset:sst2"}
    logged_config = {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}
    assert logged_config == run_configs(tmp)[0].to_flat()
    history: dict[int, dict] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            history[record.history.step.num] = items
    expected = _expected_series(_rows(out))
    assert sorted(history) == [0, 1, 2]
    for key, by_round in expected.items():
        assert {step: json.loads(items[key]) for step, items in history.items() if key in items} == by_round, key
    assert [step for step, items in history.items() if "curves/interpolation/_type" in items] == [1, 2]
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0 and kinds[-1] == "exit"
