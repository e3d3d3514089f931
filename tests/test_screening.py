"""Screening of client replies: each fault is rejected with a reason, the rest aggregate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from copra_core.config import ConfigError, RunConfig, ScreeningSettings
from copra_core.screening import check_update, norm_outliers, update_norm
from server.strategy import AdapterFedAvg
from strategies.linear import LinearAveraging
from tests.helpers import message_from

KEYS = ("m.lora_A.weight", "m.lora_B.weight")


def _state(seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m.lora_A.weight": scale * torch.randn(2, 4, generator=g),
        "m.lora_B.weight": scale * torch.randn(4, 2, generator=g),
    }


def _reply(node: int, state: dict, num_examples: object = 10, dtype: torch.dtype = torch.float32) -> Message:
    arrays = ArrayRecord({k: v.to(dtype) for k, v in state.items()})
    metrics = MetricRecord({"num-examples": num_examples, "partition-id": node})
    return message_from(RecordDict({"arrays": arrays, "metrics": metrics}), "train", src_node_id=node)


GLOBAL = {k: torch.zeros_like(v) for k, v in _state(0).items()}


def _check(state=None, dtypes=None, num_examples=10, cap=0):
    state = _state(1) if state is None else state
    dtypes = {k: "float32" for k in state} if dtypes is None else dtypes
    return check_update(state, GLOBAL, dtypes, "float32", num_examples, cap)


def test_a_good_reply_passes():
    assert _check() is None


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("nan", "non-finite values (NaN/Inf) in ['m.lora_A.weight']"),
        ("inf", "non-finite values (NaN/Inf) in ['m.lora_B.weight']"),
        ("missing", "missing keys ['m.lora_B.weight']"),
        ("extra", "unexpected keys ['bogus']"),
        ("shape", "shape mismatches ['m.lora_A.weight: (3, 4) != (2, 4)']"),
        ("dtype", "dtype float64 instead of float32 for ['m.lora_A.weight', 'm.lora_B.weight']"),
    ],
)
def test_each_adapter_fault_has_its_reason(fault, reason):
    state = _state(1)
    dtypes = None
    if fault == "nan":
        state["m.lora_A.weight"][0, 0] = float("nan")
    elif fault == "inf":
        state["m.lora_B.weight"][1, 1] = float("-inf")
    elif fault == "missing":
        del state["m.lora_B.weight"]
    elif fault == "extra":
        state["bogus"] = torch.zeros(1)
    elif fault == "shape":
        state["m.lora_A.weight"] = torch.zeros(3, 4)
    elif fault == "dtype":
        dtypes = {k: "float64" for k in state}
    assert reason in _check(state, dtypes)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (0, "not a whole number >= 1"),
        (-5, "not a whole number >= 1"),
        (2.5, "not a whole number >= 1"),
        (float("nan"), "not a whole number >= 1"),
        (float("inf"), "not a whole number >= 1"),
        (None, "not a number"),
        ("12", "not a number"),
        (True, "not a number"),
        (10_001, "exceeds screening.max-num-examples=10000"),
    ],
)
def test_implausible_example_counts_are_rejected(value, reason):
    assert reason in _check(num_examples=value, cap=10_000)


def test_whole_float_counts_and_counts_at_the_cap_pass():
    assert _check(num_examples=12.0) is None  # MetricRecord may carry a float
    assert _check(num_examples=10_000, cap=10_000) is None


def test_update_norm_matches_numpy():
    a, b = _state(1), _state(2)
    flat = np.concatenate([(a[k] - b[k]).numpy().ravel() for k in KEYS])
    assert update_norm(a, b) == pytest.approx(float(np.linalg.norm(flat)), rel=1e-6)


def test_norm_outliers_against_the_median_of_the_others():
    norms = {1: 1.0, 2: 1.2, 3: 0.9, 4: 50.0, 5: 11.0}
    ratio = 10.0
    expected = {c for c, n in norms.items() if n > ratio * np.median([m for d, m in norms.items() if d != c])}
    assert expected == {4}  # client 5: 11 is exactly 10 x the median of the others (1.1), not above
    assert set(norm_outliers(norms, ratio)) == expected
    assert "50 > 10 x median of the other replies (1.1)" in norm_outliers(norms, ratio)[4]
    # Two clients: the outlier is caught (a median over both would sit halfway).
    assert set(norm_outliers({1: 1.0, 2: 100.0}, ratio)) == {2}
    assert norm_outliers({1: 1.0}, ratio) == {}  # nothing to compare with
    assert norm_outliers(norms, 0.0) == {}  # switched off


def _strategy(**screening: object) -> AdapterFedAvg:
    return AdapterFedAvg(
        LinearAveraging(), GLOBAL, screening=ScreeningSettings(**screening), min_train_nodes=2, min_available_nodes=2
    )


def test_bad_replies_are_left_out_and_the_good_ones_averaged():
    good = {1: (_state(1), 10), 2: (_state(2), 30), 3: (_state(3), 20)}
    nan = _state(4)
    nan["m.lora_A.weight"][0, 0] = float("nan")
    replies = [_reply(node, state, n) for node, (state, n) in good.items()]
    replies += [
        _reply(4, nan),
        _reply(5, {"bogus": torch.zeros(2)}),
        _reply(6, _state(6), dtype=torch.float64),
        _reply(7, _state(7, scale=100.0)),  # absurd norm
        _reply(8, _state(8), num_examples=-1),
    ]
    strategy = _strategy()
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    total = sum(n for _, n in good.values())
    for key in KEYS:
        expected = sum(n * s[key] for s, n in good.values()) / total
        torch.testing.assert_close(strategy.current[key], expected)
    rejections = strategy.round_metrics["clients/rejections"]
    assert strategy.round_metrics["clients/rejected"] == 5
    assert [r["node-id"] for r in rejections] == [4, 5, 6, 7, 8]
    reasons = " | ".join(r["reason"] for r in rejections)
    for fragment in ("non-finite", "missing keys", "dtype float64", "update norm", "num-examples is -1"):
        assert fragment in reasons


def test_too_few_usable_replies_keep_the_global_adapter(caplog):
    bad = _state(2)
    bad["m.lora_B.weight"][:] = float("inf")
    strategy = _strategy()
    before = {k: v.clone() for k, v in strategy.current.items()}
    arrays, metrics = strategy.aggregate_train(3, [_reply(1, _state(1)), _reply(2, bad)])
    assert (arrays, metrics) == (None, None)
    assert strategy.round_metrics["round/skipped"] == 1
    for key in KEYS:
        assert torch.equal(strategy.current[key], before[key])
    assert "rejected the reply of node 2 (partition 2): non-finite" in caplog.text
    assert "1 usable replies < min_train_nodes=2" in caplog.text


def test_without_screening_a_mismatched_reply_is_an_error():
    strategy = AdapterFedAvg(LinearAveraging(), GLOBAL, min_train_nodes=2, min_available_nodes=2)
    with pytest.raises(Exception, match=r"same keys|does not match"):
        strategy.aggregate_train(1, [_reply(1, _state(1)), _reply(2, {"bogus": torch.zeros(2)})])


def test_bad_screening_settings_name_the_key():
    config = RunConfig()
    config.screening.max_norm_ratio = -1
    with pytest.raises(ConfigError, match=r"screening\.max-norm-ratio"):
        config.validate()
