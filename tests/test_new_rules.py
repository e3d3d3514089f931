"""fedrot, lora_fair and flora against independent float64 numpy computations of their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import strategies
from copra_core.config import ConfigError
from strategies.base import ClientUpdate, StrategyContractError

D_OUT, D_IN, RANK = 7, 9, 3
A_KEY, B_KEY, HEAD = "m.lora_A.weight", "m.lora_B.weight", "head.weight"
COUNTS = [7, 30, 12, 50, 1]


def _updates(factors: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator) -> list[ClientUpdate]:
    """Client updates (fp32 tensors) from numpy (B, A) pairs, with a random head each."""
    return [
        ClientUpdate(
            node_id=k,
            state={
                B_KEY: torch.tensor(b, dtype=torch.float32),
                A_KEY: torch.tensor(a, dtype=torch.float32),
                HEAD: torch.tensor(rng.normal(size=4), dtype=torch.float32),
            },
            num_examples=COUNTS[k],
        )
        for k, (b, a) in enumerate(factors)
    ]


def _current(rng: np.random.Generator, b_zero: bool = False) -> dict[str, torch.Tensor]:
    b = np.zeros((D_OUT, RANK)) if b_zero else rng.normal(size=(D_OUT, RANK))
    return {
        A_KEY: torch.tensor(rng.normal(size=(RANK, D_IN)), dtype=torch.float32),
        B_KEY: torch.tensor(b, dtype=torch.float32),
        HEAD: torch.zeros(4),
    }


def _random_clients(seed: int, num: int = 4, b_zero: bool = False):
    rng = np.random.default_rng(seed)
    factors = [(rng.normal(size=(D_OUT, RANK)), rng.normal(size=(RANK, D_IN))) for _ in range(num)]
    return _updates(factors, rng), _current(rng, b_zero)


def _rotated_clients(seed: int, num: int = 4, noise: float = 0.0):
    """Clients holding (B Q_k, Q_k^T A) (+ noise): the same product in different rank-space coordinates."""
    rng = np.random.default_rng(seed)
    b, a = rng.normal(size=(D_OUT, RANK)), rng.normal(size=(RANK, D_IN))
    factors = []
    for _ in range(num):
        q, _ = np.linalg.qr(rng.normal(size=(RANK, RANK)))
        factors.append((b @ q + noise * rng.normal(size=b.shape), q.T @ a + noise * rng.normal(size=a.shape)))
    current = _current(rng)
    current[A_KEY] = torch.tensor(a + 0.1 * rng.normal(size=a.shape), dtype=torch.float32)  # near, not equal
    return _updates(factors, rng), current


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.double().numpy()


def _weights(updates) -> np.ndarray:
    n = np.array([u.num_examples for u in updates], dtype=float)
    return n / n.sum()


def _product_average(updates) -> np.ndarray:
    return sum(w * _np(u.state[B_KEY]) @ _np(u.state[A_KEY]) for w, u in zip(_weights(updates), updates, strict=True))


def _average(updates, key) -> np.ndarray:
    return sum(w * _np(u.state[key]) for w, u in zip(_weights(updates), updates, strict=True))


def _error(updates, b: np.ndarray, a: np.ndarray) -> float:
    """||sum_k w_k B_k A_k - B A||_F / ||sum_k w_k B_k A_k||_F."""
    target = _product_average(updates)
    return float(np.linalg.norm(target - b @ a) / np.linalg.norm(target))


def _linear_error(updates) -> float:
    return _error(updates, _average(updates, B_KEY), _average(updates, A_KEY))


# ---------------------------------------------------------------------- FedRot-LoRA
def _procrustes(rows: np.ndarray, reference: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(rows @ reference.T)
    return u @ vt


@pytest.mark.parametrize("align", ["A", "B"])
def test_fedrot_averages_the_procrustes_rotated_factors(align):
    updates, current = _random_clients(seed=1)
    out = strategies.build("fedrot", f"align={align}").aggregate(updates, current)
    rotated_b, rotated_a = [], []
    for u in updates:
        b, a = _np(u.state[B_KEY]), _np(u.state[A_KEY])
        rows, reference = (a, _np(current[A_KEY])) if align == "A" else (b.T, _np(current[B_KEY]).T)
        rotation = _procrustes(rows, reference)
        np.testing.assert_allclose(rotation.T @ rotation, np.eye(RANK), atol=1e-12)  # orthogonal
        new_b, new_a = b @ rotation, rotation.T @ a
        np.testing.assert_allclose(new_b @ new_a, b @ a, rtol=1e-10, atol=1e-10)  # product unchanged
        # R is the best orthogonal map: no other (here: identity, random) aligns better.
        best = np.linalg.norm(rotation.T @ rows - reference)
        q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(RANK, RANK)))
        assert best <= min(np.linalg.norm(rows - reference), np.linalg.norm(q.T @ rows - reference))
        rotated_b.append(new_b)
        rotated_a.append(new_a)
    w = _weights(updates)
    np.testing.assert_allclose(_np(out[B_KEY]), sum(wk * b for wk, b in zip(w, rotated_b, strict=True)), rtol=1e-5)
    np.testing.assert_allclose(_np(out[A_KEY]), sum(wk * a for wk, a in zip(w, rotated_a, strict=True)), rtol=1e-5)
    np.testing.assert_allclose(_np(out[HEAD]), _average(updates, HEAD), rtol=1e-6)


def test_fedrot_is_exact_when_clients_are_rotations_of_each_other():
    updates, current = _rotated_clients(seed=0)
    rule = strategies.build("fedrot", "align=A")
    out = rule.aggregate(updates, current)
    assert _linear_error(updates) > 0.3  # averaging misaligned factors loses much of the update
    assert _error(updates, _np(out[B_KEY]), _np(out[A_KEY])) < 1e-5
    assert rule.round_metrics()["rotation_distance"] > 0.5


@pytest.mark.parametrize("seed", range(5))
def test_fedrot_error_is_not_larger_than_linear_on_shared_structure(seed):
    """Rotated copies of one adapter plus independent noise, both factors aligned in turn."""
    updates, current = _rotated_clients(seed=seed, noise=0.05)
    rule = strategies.build("fedrot")  # alternate: A in round 1
    out = rule.aggregate(updates, current)
    assert _error(updates, _np(out[B_KEY]), _np(out[A_KEY])) < 0.1 < _linear_error(updates)
    again, _ = _rotated_clients(seed=seed + 10, noise=0.05)
    out_b = strategies.build("fedrot", "align=B").aggregate(again, out)  # B aligned to the round-1 aggregate
    assert _error(again, _np(out_b[B_KEY]), _np(out_b[A_KEY])) <= _linear_error(again)


def test_fedrot_leaves_a_zero_reference_alone_and_resumes_its_schedule(tmp_path):
    updates, current = _random_clients(seed=3, b_zero=True)
    # B = 0 has no orientation to align to: the round is plain linear averaging.
    out = strategies.build("fedrot", "align=B").aggregate(updates, current)
    for key in (A_KEY, B_KEY):
        np.testing.assert_allclose(_np(out[key]), _average(updates, key), rtol=1e-5, atol=1e-6)
    # The authors' alternation (A in round 1 here, where they skip), and it survives a checkpoint:
    # round 3 aligns B in the uninterrupted and in the resumed rule, unlike a rule that starts afresh.
    rule = strategies.build("fedrot")
    assert [rule.aligned_factor(t) for t in range(1, 6)] == ["A", "A", "B", "A", "B"]
    second, _ = _random_clients(seed=4)
    after_two = rule.aggregate(second, rule.aggregate(updates, current))
    save_file(rule.state_dict(), tmp_path / "rule.safetensors")
    resumed = strategies.build("fedrot")
    resumed.load_state_dict(load_file(tmp_path / "rule.safetensors"))
    third, _ = _random_clients(seed=5)
    uninterrupted, continued = rule.aggregate(third, after_two), resumed.aggregate(third, after_two)
    assert all(torch.equal(uninterrupted[k], continued[k]) for k in after_two)
    afresh = strategies.build("fedrot").aggregate(third, after_two)  # its round 1: A aligned
    assert not torch.allclose(afresh[B_KEY], continued[B_KEY], atol=1e-3)
    with pytest.raises(StrategyContractError, match="fedrot"):
        resumed.load_state_dict({"m.base_offset": torch.zeros(2, 2)})
    with pytest.raises(ConfigError, match="align"):
        strategies.build("fedrot", "align=C")


# ---------------------------------------------------------------------- LoRA-FAIR
@pytest.mark.parametrize("ridge", [0.0, 0.01, 1.0])
def test_lora_fair_matches_the_ridge_correction_recomputed_in_numpy(ridge):
    updates, current = _random_clients(seed=5, num=5)
    out = strategies.build("lora_fair", f"ridge={ridge}").aggregate(updates, current)
    a_bar, b_bar = _average(updates, A_KEY), _average(updates, B_KEY)
    gram = a_bar @ a_bar.T
    damping = ridge * np.trace(gram) / RANK
    delta = (_product_average(updates) - b_bar @ a_bar) @ a_bar.T @ np.linalg.inv(gram + damping * np.eye(RANK))
    np.testing.assert_allclose(_np(out[B_KEY]), b_bar + delta, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_np(out[A_KEY]), a_bar, rtol=1e-6)  # A is the plain average
    np.testing.assert_allclose(_np(out[HEAD]), _average(updates, HEAD), rtol=1e-6)
    if ridge == 0:
        # Least squares: the exact average projected onto A_bar's row space, the best any B can do.
        projector = a_bar.T @ np.linalg.inv(gram) @ a_bar
        best = _product_average(updates) @ projector
        np.testing.assert_allclose(_np(out[B_KEY]) @ _np(out[A_KEY]), best, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_lora_fair_error_is_not_larger_than_linear(seed):
    updates, current = _random_clients(seed=seed)
    norms = []
    for ridge in (0.0, 0.1, 10.0):
        rule = strategies.build("lora_fair", f"ridge={ridge}")
        out = rule.aggregate(updates, current)
        assert _error(updates, _np(out[B_KEY]), _np(out[A_KEY])) < _linear_error(updates)
        norms.append(rule.round_metrics()["correction_norm"])
    assert norms[0] > norms[1] > norms[2] > 0  # a larger ridge keeps B closer to the plain average


def test_lora_fair_rejects_a_negative_ridge():
    with pytest.raises(ConfigError, match="ridge"):
        strategies.build("lora_fair", "ridge=-1")


# ---------------------------------------------------------------------- FLoRA
def test_flora_merges_the_exact_average_into_the_offset_and_restarts_the_adapter():
    updates, current = _random_clients(seed=6)
    rule = strategies.build("flora", "seed=3")
    out = rule.aggregate(updates, current)
    offset = _np(rule.base_offset()["m.base_offset"])
    target = _product_average(updates)
    # Offset + the new adapter's product = sum_k w_k B_k A_k, to fp32 precision.
    merged = offset + _np(out[B_KEY]) @ _np(out[A_KEY])
    assert np.linalg.norm(merged - target) / np.linalg.norm(target) < 1e-6
    assert not out[B_KEY].any()  # B = 0: the fresh adapter adds nothing yet
    bound = 1 / np.sqrt(D_IN)
    assert 0 < np.abs(_np(out[A_KEY])).max() <= bound and not torch.equal(out[A_KEY], current[A_KEY])
    np.testing.assert_allclose(_np(out[HEAD]), _average(updates, HEAD), rtol=1e-6)
    # The fresh A depends on the seed and the round only.
    twin = strategies.build("flora", "seed=3").aggregate(_random_clients(seed=7)[0], current)
    assert torch.equal(twin[A_KEY], out[A_KEY])
    assert not torch.equal(strategies.build("flora", "seed=4").aggregate(updates, current)[A_KEY], out[A_KEY])


def test_flora_accumulates_over_rounds_and_resumes_from_its_state(tmp_path):
    updates_1, current = _random_clients(seed=8)
    rule = strategies.build("flora")
    out_1 = rule.aggregate(updates_1, current)
    save_file(rule.state_dict(), tmp_path / "rule.safetensors")  # what a checkpoint holds
    updates_2, _ = _random_clients(seed=9)
    out_2 = rule.aggregate(updates_2, out_1)
    expected = _product_average(updates_1) + _product_average(updates_2)
    offset = _np(rule.base_offset()["m.base_offset"])
    assert np.linalg.norm(offset - expected) / np.linalg.norm(expected) < 1e-6
    assert not out_2[B_KEY].any() and not torch.equal(out_2[A_KEY], out_1[A_KEY])  # a new A every round
    assert rule.round_metrics()["merged_norm"] == pytest.approx(np.linalg.norm(_product_average(updates_2)))
    resumed = strategies.build("flora")
    resumed.load_state_dict(load_file(tmp_path / "rule.safetensors"))
    continued = resumed.aggregate(updates_2, out_1)
    assert all(torch.equal(continued[k], out_2[k]) for k in out_2)
    assert torch.equal(resumed.base_offset()["m.base_offset"], rule.base_offset()["m.base_offset"])
    with pytest.raises(StrategyContractError, match="flora"):
        resumed.load_state_dict({"m.base_offset": torch.zeros(D_OUT, D_IN)})  # no round counter
