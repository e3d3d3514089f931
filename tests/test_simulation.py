"""End-to-end runs through Flower's simulation engine (Ray), each in a subprocess.

A subprocess per run keeps Ray's processes out of the test process; the tests check
that none is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import exported_accuracy, load_exported
from tests.helpers import run_tagged as _run

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = {
    "round",
    "global/accuracy",
    "global/loss",
    "barrier/jensen_factor",
    "barrier/jensen_product",
    "barrier/pairwise_max",
    "aggregation/exactness_error",
    "comm/bytes_up",
    "comm/bytes_down",
    "time/round_s",
}

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quick")
    out = tmp / "run"
    proc = _run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--quick", "--out", str(out), "--no-display"],
        tmp,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_quick_run_writes_every_output(quick_run):
    for name in ("metrics.jsonl", "config.json", "report.md", "accuracy.png", "barriers.png", "interpolation.png"):
        assert (quick_run / name).is_file(), name
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(quick_run / "adapter"))
    rows = [json.loads(line) for line in (quick_run / "metrics.jsonl").read_text().splitlines()]
    # config.json: the flat config the run used, which RunConfig.from_flat reads back.
    from copra_core.checkpoint import RUN_OUTPUTS
    from copra_core.config import RunConfig, read_config_json
    from simulations.scenarios import scenario_config

    expected = scenario_config("quick")
    expected.out_dir = str(quick_run)
    assert RunConfig.from_flat(read_config_json(quick_run / "config.json")) == expected
    assert [r["round"] for r in rows] == list(range(expected.federation.rounds + 1))
    # Everything the run wrote is a run output, so --overwrite leaves none of it behind.
    assert set(os.listdir(quick_run)) <= set(RUN_OUTPUTS)
    for row in rows[1:]:
        assert row.keys() >= REQUIRED_KEYS
        assert all(isinstance(row[k], (int, float)) for k in REQUIRED_KEYS), row
        assert row["comm/bytes_up"] > 0 and row["comm/bytes_down"] > 0
        assert 0 <= row["aggregation/exactness_error"] < 1
    assert "![barriers](barriers.png)" in (quick_run / "report.md").read_text()


def test_quick_run_beats_chance(quick_run):
    rows = [json.loads(line) for line in (quick_run / "metrics.jsonl").read_text().splitlines()]
    # 200 balanced-ish dev examples: chance is ~0.5, and 0.6 is > 2.8 standard errors above it.
    assert rows[-1]["global/accuracy"] >= 0.6, rows[-1]["global/accuracy"]


def test_exported_adapter_reproduces_the_run(quick_run):
    """PeftModel.from_pretrained on the base model gives the run's final accuracy exactly."""
    flat_rows = [json.loads(line) for line in (quick_run / "metrics.jsonl").read_text().splitlines()]
    assert not (quick_run / "base_offset.safetensors").exists()  # linear keeps the base as it is
    assert exported_accuracy(quick_run) == pytest.approx(flat_rows[-1]["global/accuracy"], abs=1e-12)


def test_federated_metrics_are_those_of_the_pooled_client_examples(quick_run):
    """federated/* of the last round = the final adapter on every client's validation set pooled.

    Computed here with the exported adapter and plain PyTorch, not the client's code.
    """
    config, task, model = load_exported(quick_run)
    last = [json.loads(line) for line in (quick_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert not [k for k in last if k.startswith("federated/sum/")], "the pooled sums leaked into the row"
    correct = loss_sum = count = 0.0
    with torch.no_grad():
        for partition in range(config.federation.clients):
            _, val = task.client_examples(partition, config.federation.clients)
            for batch in task.eval_batches(val, 64):
                labels = batch.pop("labels")
                logits = model(**batch).logits
                correct += float((logits.argmax(-1) == labels).sum())
                loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                count += labels.numel()
    assert last["federated/accuracy"] == pytest.approx(correct / count, abs=1e-12)
    assert last["federated/loss"] == pytest.approx(loss_sum / count, rel=1e-4)


FAULTY_CLIENTS = textwrap.dedent(
    """
    import sys

    import torch
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    import client.app as real
    from simulations.runner import simulate_many
    from simulations.scenarios import scenario_config

    app = ClientApp()

    def fault(partition, arrays, metrics, screening):
        # Partitions 0 and 1 are honest; each other partition sends one kind of bad update.
        # Without screening only partition 2 misbehaves (NaN), the fault linear would average.
        first = next(iter(arrays))
        if partition == 2:
            arrays[first] = torch.full_like(arrays[first], float("nan"))
        elif not screening:
            pass
        elif partition == 3:
            arrays["bogus." + first] = arrays.pop(first)
        elif partition == 4:
            arrays[first] = arrays[first][:1]
        elif partition == 5:
            arrays = {k: v.double() for k, v in arrays.items()}
        elif partition == 6:
            arrays = {k: 1e4 * v for k, v in arrays.items()}
        elif partition == 7:
            metrics["num-examples"] = 0
        return arrays, metrics

    @app.train()
    def train(msg, context):
        reply = real.train(msg, context)
        arrays = reply.content.array_records["arrays"].to_torch_state_dict()
        metrics = dict(reply.content.metric_records["metrics"])
        screening = bool(msg.content.config_records["config"]["screening.enabled"])
        arrays, metrics = fault(int(context.node_config["partition-id"]), arrays, metrics, screening)
        content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    # Two runs on the same eight nodes: with screening (2 rounds), then without (it fails).
    configs = []
    for name, screening, rounds in (("screened", True, 2), ("unscreened", False, 1)):
        config = scenario_config("quick")
        config.out_dir = f"{sys.argv[1]}/{name}"
        config.federation.clients = 8
        config.federation.rounds = rounds
        config.federation.fraction_evaluate = 0.0
        config.train.local_steps = 20
        config.screening.enabled = screening
        configs.append(config)
    simulate_many(configs, client_app=app)
    """
)

REJECTED = {
    2: "non-finite values",
    3: "unexpected keys ['bogus.",
    4: "shape mismatches",
    5: "dtype float64 instead of float32",
    6: "update norm",
    7: "num-examples is 0",
}


@pytest.fixture(scope="module")
def faulty_runs(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """Six faulty clients, one per fault, and two honest ones, through Flower's simulation."""
    tmp = tmp_path_factory.mktemp("faulty")
    script = tmp / "faulty.py"
    script.write_text(FAULTY_CLIENTS)
    return _run([sys.executable, str(script), str(tmp / "out")], tmp, timeout=900), tmp / "out"


def test_bad_updates_are_rejected_and_the_run_continues(faulty_runs):
    proc, out = faulty_runs
    out = out / "screened"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2], proc.stdout[-3000:] + proc.stderr[-3000:]  # both rounds ran
    for row in rows[1:]:
        assert row["clients/sampled"] == 8 and row["clients/rejected"] == 6
        reasons = {r["partition-id"]: r["reason"] for r in row["clients/rejections"]}
        assert set(reasons) == set(REJECTED)
        for partition, fragment in REJECTED.items():
            assert fragment in reasons[partition], (partition, reasons[partition])
        # Diagnostics and aggregation saw the two honest clients only.
        assert sorted(c["partition-id"] for c in row["clients"]) == [0, 1]
        assert np.isfinite(row["global/accuracy"]) and np.isfinite(row["barrier/jensen_factor"])
    assert "rejected the reply of node" in proc.stdout + proc.stderr
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_without_screening_a_bad_update_stops_the_run_with_a_named_error(faulty_runs):
    """The server checks every rule's aggregate (server/strategy.py): one NaN update made linear's non-finite."""
    proc, out = faulty_runs
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "produced non-finite values in round 1" in output, output[-3000:]
    assert (out / "unscreened" / "metrics.jsonl").exists()  # the run started
    assert not (out / "unscreened" / "adapter").exists()  # nothing exported from a failed run
