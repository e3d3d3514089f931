"""Every built-in rule against an independent (numpy) computation of its definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import strategies
from copra_core.diagnostics import aggregate_error, exactness_error, normalised_weights
from strategies.base import ClientUpdate, StrategyContractError

KEYS = {"m.lora_A.weight": (3, 6), "m.lora_B.weight": (5, 3), "head.weight": (4,)}


def _setup(num: int = 5, seed: int = 0, shared_a: bool = False):
    g = torch.Generator().manual_seed(seed)
    current = {k: torch.randn(shape, generator=g) for k, shape in KEYS.items()}
    updates = []
    for i in range(num):
        state = {k: v + torch.randn(v.shape, generator=g) * (i + 1) / num for k, v in current.items()}
        if shared_a:
            state["m.lora_A.weight"] = current["m.lora_A.weight"].clone()
        updates.append(ClientUpdate(node_id=100 + i, state=state, num_examples=[7, 30, 12, 50, 1, 9, 3][i]))
    return updates, current


def _np(updates, key):
    return np.stack([u.state[key].double().numpy() for u in updates])


def _weights(updates):
    n = np.array([u.num_examples for u in updates], dtype=float)
    return n / n.sum()


def test_median_and_trimmed_mean_match_numpy():
    updates, current = _setup(num=5)
    med = strategies.build("median").aggregate(updates, current)
    trimmed = strategies.build("trimmed_mean", "trim-fraction=0.2").aggregate(updates, current)
    for key in current:
        values = _np(updates, key)
        np.testing.assert_allclose(med[key].numpy(), np.median(values, axis=0), rtol=1e-6, atol=1e-6)
        # 5 clients, 20 %: drop one from each end, average the middle three.
        np.testing.assert_allclose(
            trimmed[key].numpy(), np.sort(values, axis=0)[1:4].mean(axis=0), rtol=1e-6, atol=1e-6
        )


def test_median_ignores_one_wild_client_that_linear_follows():
    updates, current = _setup(num=5)
    wild = {k: v + 1e3 for k, v in updates[0].state.items()}
    updates[0] = ClientUpdate(node_id=0, state=wild, num_examples=10_000)
    linear = strategies.build("linear").aggregate(updates, current)
    median = strategies.build("median").aggregate(updates, current)
    assert float(linear["head.weight"].abs().max()) > 500
    assert float(median["head.weight"].abs().max()) < 10


def test_norm_clip_matches_numpy_and_bounds_every_client():
    updates, current = _setup(num=4)
    rule = strategies.build("norm_clip", "max-norm=1.5")
    out = rule.aggregate(updates, current)
    w = _weights(updates)
    deltas = [{k: u.state[k].double().numpy() - current[k].double().numpy() for k in current} for u in updates]
    norms = [np.sqrt(sum((d[k] ** 2).sum() for k in d)) for d in deltas]
    scales = [min(1.0, 1.5 / n) for n in norms]
    for key in current:
        expected = current[key].double().numpy() + sum(
            wk * s * d[key] for wk, s, d in zip(w, scales, deltas, strict=True)
        )
        np.testing.assert_allclose(out[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert rule.round_metrics()["clipped_clients"] == sum(n > 1.5 for n in norms) > 0
    # Adaptive bound (max-norm = 0): the median norm.
    adaptive = strategies.build("norm_clip")
    adaptive.aggregate(updates, current)
    assert adaptive.round_metrics()["clip_bound"] == pytest.approx(float(np.median(norms)), rel=1e-6)


def _ties_numpy(deltas: np.ndarray, scales: np.ndarray, density: float) -> np.ndarray:
    """TIES from the paper's three steps, written independently of PEFT."""
    k, flat = deltas.shape[0], deltas.reshape(deltas.shape[0], -1)
    keep = int(density * flat.shape[1])
    trimmed = np.zeros_like(flat)
    for i in range(k):
        top = np.argsort(-np.abs(flat[i]), kind="stable")[:keep]
        trimmed[i, top] = flat[i, top]
    sign = np.sign(trimmed.sum(axis=0))
    sign[sign == 0] = 1
    weighted = trimmed * scales[:, None]
    agree = np.sign(trimmed) == sign
    merged = (weighted * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)
    return merged.reshape(deltas.shape[1:])


def test_ties_matches_an_independent_implementation():
    updates, current = _setup(num=4, seed=3)
    out = strategies.build("ties", "density=0.5").aggregate(updates, current)
    scales = _weights(updates) * len(updates)
    for key in current:
        deltas = _np(updates, key) - current[key].double().numpy()
        expected = current[key].double().numpy() + _ties_numpy(deltas, scales, 0.5)
        np.testing.assert_allclose(out[key].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_dare_is_linear_at_density_one_and_unbiased_below():
    updates, current = _setup(num=3)
    linear = strategies.build("linear").aggregate(updates, current)
    full = strategies.build("dare", "density=1.0").aggregate(updates, current)
    for key in current:
        torch.testing.assert_close(full[key], linear[key], rtol=1e-5, atol=1e-5)
    # Drop-and-rescale is unbiased: the mean over 400 seeded rounds approaches linear.
    rule = strategies.build("dare", "density=0.5, seed=7")
    runs = [rule.aggregate(updates, current)["m.lora_B.weight"] for _ in range(400)]
    mean = torch.stack(runs).mean(0)
    spread = torch.stack(runs).std(0) / 20  # standard error of the mean
    assert torch.all((mean - linear["m.lora_B.weight"]).abs() < 5 * spread + 1e-6)
    # Reproducible: same seed, same masks; and each round draws new masks.
    again = strategies.build("dare", "density=0.5, seed=7")
    torch.testing.assert_close(again.aggregate(updates, current)["m.lora_B.weight"], runs[0])
    assert not torch.equal(runs[0], runs[1])


def _adam_numpy(current, averages, eta, b1, b2, tau, yogi=False):
    """Reddi et al. 2021, Algorithm 2 (with Flower's bias-corrected step for Adam)."""
    x, m, v = current.copy(), np.zeros_like(current), np.zeros_like(current)
    for t, avg in enumerate(averages, start=1):
        delta = avg - x
        m = b1 * m + (1 - b1) * delta
        if yogi:
            v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
            x = x + eta * m / (np.sqrt(v) + tau)
        else:
            v = b2 * v + (1 - b2) * delta**2
            x = x + eta * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1)) * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimisers_match_the_papers_update(name):
    rule = strategies.build(name, "eta=0.05, tau=0.01")
    _, current = _setup()
    averages = {k: [] for k in current}
    state = current
    for round_seed in range(3):  # moments carry over between rounds
        updates, _ = _setup(seed=10 + round_seed)
        w = _weights(updates)
        for key in current:
            averages[key].append(sum(wk * u.state[key].double().numpy() for wk, u in zip(w, updates, strict=True)))
        state = rule.aggregate(updates, state)
    for key in current:
        expected = _adam_numpy(current[key].double().numpy(), averages[key], 0.05, 0.9, 0.99, 0.01, name == "fedyogi")
        np.testing.assert_allclose(state[key].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_ffa_is_exact_in_product_space_and_rejects_a_changed_a():
    updates, current = _setup(shared_a=True)
    rule = strategies.build("ffa")
    assert rule.client_overrides == {"lora.freeze-a": True}
    out = rule.aggregate(updates, current)
    assert torch.equal(out["m.lora_A.weight"], current["m.lora_A.weight"])
    weights = normalised_weights([u.num_examples for u in updates])
    states = [u.state for u in updates]
    assert aggregate_error(states, weights, out) < 1e-6
    assert exactness_error(states, weights) < 1e-6
    moved, _ = _setup(shared_a=False)
    with pytest.raises(StrategyContractError, match=r"client node 100 changed the frozen 'm.lora_A.weight'"):
        rule.aggregate(moved, current)


def test_aggregate_error_ranks_rules_by_distance_from_the_exact_average():
    updates, current = _setup(num=4)
    weights = normalised_weights([u.num_examples for u in updates])
    states = [u.state for u in updates]
    svd = aggregate_error(states, weights, strategies.build("product_svd").aggregate(updates, current))
    linear = aggregate_error(states, weights, strategies.build("linear").aggregate(updates, current))
    assert linear == pytest.approx(exactness_error(states, weights), rel=1e-5)
    assert svd < linear  # the best rank-r approximation beats factor averaging


@pytest.mark.parametrize("name", sorted(strategies.BUILTIN))
def test_every_builtin_passes_the_dry_run_and_keeps_dtypes(name):
    updates, current = _setup()
    rule = strategies.build(name)
    strategies.dry_run(rule, current)
    if rule.client_overrides.get("lora.freeze-a"):
        updates, _ = _setup(shared_a=True)
    out = rule.aggregate(updates, current)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: (v.shape, v.dtype) for k, v in current.items()}
    assert all(torch.isfinite(v).all() for v in out.values())


def test_residual_folds_exactly_what_factor_averaging_misses_and_accumulates():
    rule = strategies.build("residual")
    offsets_before = {}
    for round_seed in range(2):
        updates, current = _setup(num=4, seed=20 + round_seed)
        out = rule.aggregate(updates, current)
        weights = normalised_weights([u.num_examples for u in updates])
        linear = strategies.build("linear").aggregate(updates, current)
        for key in current:
            torch.testing.assert_close(out[key], linear[key])  # the adapter is the linear average
        offsets = {k: v.double().numpy() for k, v in rule.base_offset().items()}
        change = offsets["m.base_offset"] - offsets_before.get("m.base_offset", 0.0)
        exact = sum(
            w * u.state["m.lora_B.weight"].double().numpy() @ u.state["m.lora_A.weight"].double().numpy()
            for w, u in zip(weights, updates, strict=True)
        )
        folded = out["m.lora_B.weight"].double().numpy() @ out["m.lora_A.weight"].double().numpy() + change
        np.testing.assert_allclose(folded, exact, rtol=1e-5, atol=1e-6)
        states = [u.state for u in updates]
        assert aggregate_error(states, weights, out, {"m": torch.from_numpy(change)}) < 1e-6
        assert aggregate_error(states, weights, out) > 1e-2  # without the fold it is not exact
        offsets_before = offsets
