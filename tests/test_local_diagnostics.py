"""Client-side diagnostics (``diagnostics.where``): the client's measurement, the server's reduction,
and one Flower simulation with ``where=both``.

The independent computation evaluates the adapters with the server's evaluator
(``ServerEvaluator``, its own batches and code path) on each client's validation rows, forms
the interpolated adapters in numpy, and applies the gap and barrier formulas in numpy.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType, RecordDict

from copra_core import local_diagnostics as ld
from copra_core import protocol
from copra_core.config import RunConfig
from copra_core.evaluator import ServerEvaluator
from copra_core.learner import ClientLearner
from server.diagnostics import LocalDiagnostics
from tests.helpers import metrics_rows, tiny_config
from tests.helpers import run_tagged as _run

GRID = [0.0, 0.25, 0.5, 0.75, 1.0]


def _perturbed(state: dict[str, torch.Tensor], seed: int, scale: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in state.items()}


def _numpy_line(own: dict[str, torch.Tensor], aggregate: dict[str, torch.Tensor], alpha: float) -> dict:
    """(1 - alpha) theta_k + alpha theta_bar, tensor by tensor in float64 numpy."""
    return {
        k: torch.from_numpy((1 - alpha) * own[k].double().numpy() + alpha * aggregate[k].double().numpy()).float()
        for k in own
    }


@pytest.fixture(scope="module")
def two_clients(bundle):
    """Two clients' adapters (different perturbations of the seeded adapter), an aggregate, and their replies."""
    config = tiny_config()
    learners = [ClientLearner(config, pid, 2) for pid in (0, 1)]
    initial = bundle.initial_state()
    own = [_perturbed(initial, seed, 0.05) for seed in (1, 2)]
    aggregate = _perturbed(initial, 3, 0.05)
    weights = [120.0, 40.0]
    figures = [
        ld.measure_client(
            learner.evaluate,
            ld.TrainedAdapter(1, state, {}, weight),
            aggregate,
            {},
            GRID,
            bundle.task.metric,
        )
        for learner, state, weight in zip(learners, own, weights, strict=True)
    ]
    return bundle, learners, own, aggregate, weights, figures


def test_client_figures_match_an_independent_evaluation(two_clients):
    bundle, learners, own, aggregate, _, figures = two_clients
    for learner, state, fig in zip(learners, own, figures, strict=True):
        evaluator = ServerEvaluator(bundle, learner.val_examples, batch_size=5)  # other batching, other code path
        expected = [evaluator.factor(_numpy_line(state, aggregate, a))["loss"] for a in GRID]
        got = [fig[ld.CURVE.format(i)] for i in range(len(GRID))]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        assert fig[ld.LOSS_OWN] == pytest.approx(expected[0], rel=1e-4)
        assert fig[ld.LOSS_GLOBAL] == pytest.approx(expected[-1], rel=1e-4)
        assert fig[ld.METRIC_OWN] == pytest.approx(evaluator.factor(state)["accuracy"], abs=1e-9)
        # The points are distinct losses, not one value repeated: the test could see a wrong alpha.
        assert len({round(v, 6) for v in got}) == len(GRID)


def _reply(metrics: dict) -> Message:
    msg = Message(content=RecordDict(), dst_node_id=7, message_type=MessageType.EVALUATE)
    return protocol.reply(msg, metrics)


def test_server_reduction_is_the_numpy_gap_and_barrier(two_clients, run_identity):
    _, _, _, _, weights, figures = two_clients
    replies = [
        _reply({"loss": 0.5, protocol.NUM_EXAMPLES: 16, **fig, ld.PARTITION: pid})
        for pid, fig in zip((1, 0), reversed(figures), strict=True)  # arrival order is not partition order
    ]
    reduced = LocalDiagnostics(GRID, "accuracy")(replies)

    w = np.array(weights) / sum(weights)
    own = np.array([f[ld.LOSS_OWN] for f in figures])
    glob = np.array([f[ld.LOSS_GLOBAL] for f in figures])
    curves = np.array([[f[ld.CURVE.format(i)] for i in range(len(GRID))] for f in figures])
    alphas = np.array(GRID)
    chord = (1 - alphas)[None, :] * own[:, None] + alphas[None, :] * glob[:, None]
    interior = (alphas > 0) & (alphas < 1)
    bumps = (curves - chord)[:, interior].max(axis=1)

    assert reduced["local/jensen_gap"] == pytest.approx(float(w @ (glob - own)), rel=1e-9, abs=1e-12)
    assert reduced["local/barrier_max"] == pytest.approx(float(bumps.max()), rel=1e-9, abs=1e-12)
    assert reduced["local/barrier_mean"] == pytest.approx(float(bumps.mean()), rel=1e-9, abs=1e-12)
    assert reduced["local/clients"] == 2
    rows = reduced["local_clients"]
    assert [r["partition-id"] for r in rows] == [0, 1]
    np.testing.assert_allclose([r["barrier"] for r in rows], bumps, rtol=1e-9)
    # The local figures are taken out of the replies: Flower's federated evaluation sees what it always saw.
    for reply in replies:
        assert set(protocol.reply_metrics(reply)) == {"loss", protocol.NUM_EXAMPLES}


def test_a_client_that_did_not_train_this_round_reports_nothing_and_drops_the_stale_adapter(run_identity):
    state = RecordDict()
    ld.keep(state, ld.TrainedAdapter(2, {"m.lora_A.weight": torch.ones(2, 3)}, {}, 10.0))
    assert ld.take(state, 3) is None
    assert len(state) == 0  # dropped, not kept for a later round
    ld.keep(state, ld.TrainedAdapter(3, {"m.lora_A.weight": torch.ones(2, 3)}, {}, 10.0, run="first"))
    assert ld.take(state, 3, run="second") is None  # another run of a sweep numbers its rounds alike
    assert len(state) == 0
    ld.keep(state, ld.TrainedAdapter(3, {"m.lora_A.weight": torch.ones(2, 3)}, {}, 10.0, run="first"))
    kept = ld.take(state, 3, run="first")
    assert kept is not None and kept.weight == 10.0 and torch.equal(kept.state["m.lora_A.weight"], torch.ones(2, 3))
    assert LocalDiagnostics(GRID, "accuracy")([_reply({"loss": 0.1, protocol.NUM_EXAMPLES: 3})]) == {}


def test_moved_base_interpolates_the_offsets_with_the_adapter():
    """residual/flora: theta_k on the round's base, theta_bar on the new one; the line joins the whole models."""
    seen: list[tuple[float, float]] = []

    def evaluate(state, offsets):  # records (adapter value, offset value) per call; loss = their sum squared
        a, o = float(state["m.lora_A.weight"][0, 0]), float(offsets["m.base_offset"][0, 0])
        seen.append((a, o))
        return {"loss": (a + o) ** 2, "accuracy": 0.0}

    trained = ld.TrainedAdapter(1, {"m.lora_A.weight": torch.zeros(1, 1)}, {"m.base_offset": torch.zeros(1, 1)}, 1.0)
    figures = ld.measure_client(
        evaluate,
        trained,
        {"m.lora_A.weight": torch.ones(1, 1)},
        {"m.base_offset": torch.full((1, 1), 2.0)},
        GRID,
        "accuracy",
    )
    np.testing.assert_allclose([figures[ld.CURVE.format(i)] for i in range(5)], [(3 * a) ** 2 for a in GRID])
    assert seen[:2] == [(0.0, 0.0), (1.0, 2.0)]


def test_diagnostics_where_resolution():
    config = RunConfig()
    assert config.diagnostics_where() == "server"  # auto, the server has its dev set
    config.update({"diagnostics.where": "both"})
    assert config.diagnostics_where() == "both"
    if hasattr(config.data, "server_eval"):
        auto = RunConfig.from_flat({"data.server-eval": "none"})
        assert auto.diagnostics_where() == "clients"


# ---------------------------------------------------------------------- end to end
RECORDER = textwrap.dedent(
    """
    import json, sys
    from server import strategy

    original = strategy.AdapterFedAvg.aggregate_evaluate.__wrapped__
    seen = []

    def recording(self, server_round, replies):
        replies = list(replies)
        for reply in replies:
            content = reply.content
            seen.append({
                "arrays": len(content.array_records),
                "configs": len(content.config_records),
                "values": {k: type(v).__name__ for r in content.metric_records.values() for k, v in r.items()},
            })
        return original(self, server_round, replies)

    strategy.AdapterFedAvg.aggregate_evaluate = strategy.in_run_rounds(recording)
    seen_path = sys.argv.pop(1)
    from simulations.cli import main
    try:
        main()
    finally:
        with open(seen_path, "w") as f:
            json.dump(seen, f)
    """
)


@pytest.mark.e2e
def test_both_in_a_flower_simulation(tmp_path):
    script = tmp_path / "record.py"
    script.write_text(RECORDER)
    seen_path, out = tmp_path / "seen.json", tmp_path / "run"
    args = [sys.executable, str(script), str(seen_path), "simulate", "--quick", "--rounds", "2", "--no-display"]
    args += ["--out", str(out), "--set", "diagnostics.where=both", "--set", "train.local-steps=8"]
    proc = _run(args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["local/clients"] == 2
        for key in ("local/jensen_gap", "local/barrier_max", "barrier/jensen_factor", "barrier/pairwise_max"):
            assert math.isfinite(row[key]), key
        clients = row["local_clients"]
        assert [c["partition-id"] for c in clients] == [0, 1]
        for c in clients:
            assert c["curve"][0] == c["loss_own"] and c["curve"][-1] == c["loss_global"]
        weights = np.array([c["weight"] for c in clients]) / sum(c["weight"] for c in clients)
        gap = sum(w * (c["loss_global"] - c["loss_own"]) for w, c in zip(weights, clients, strict=True))
        assert row["local/jensen_gap"] == pytest.approx(gap, rel=1e-9)
        assert not any(k.startswith("federated/local") for k in row)  # kept out of the pooled evaluation
    assert "local/jensen_gap" not in rows[0]

    seen = json.loads(seen_path.read_text())
    assert len(seen) == 4  # 2 rounds x 2 clients
    for reply in seen:
        assert reply["arrays"] == 0 and reply["configs"] == 0
        assert set(reply["values"].values()) <= {"int", "float"}, reply["values"]
        assert any(k.startswith("local/curve_") for k in reply["values"])
    report = (out / "report.md").read_text()
    assert "local.png" in report and (out / "local.png").is_file()
