"""Diagnostics against independent computations and cases with known answers."""

import numpy as np
import pytest
import torch

from copra_core.adapters import get_adapter_state
from copra_core.diagnostics import (
    choose_pairs,
    exactness_error,
    normalised_weights,
    round_diagnostics,
    weighted_average,
)
from copra_core.evaluator import ServerEvaluator


def _random_state(seed: int, modules=("m0", "m1"), r=3, d_in=5, d_out=4, shared_a=None):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in modules:
        state[f"{m}.lora_A.weight"] = shared_a[m] if shared_a else torch.randn(r, d_in, generator=g)
        state[f"{m}.lora_B.weight"] = torch.randn(d_out, r, generator=g)
    state["head.weight"] = torch.randn(2, d_out, generator=g)
    return state


def test_weighted_average_matches_numpy():
    states = [_random_state(s) for s in range(3)]
    weights = normalised_weights([10, 30, 60])
    avg = weighted_average(states, weights)
    for key in states[0]:
        expected = sum(w * s[key].numpy().astype(np.float64) for w, s in zip(weights, states, strict=True))
        np.testing.assert_allclose(avg[key].numpy(), expected, rtol=1e-6, atol=1e-6)


def test_exactness_error_matches_numpy_and_is_zero_for_shared_a():
    states = [_random_state(s) for s in range(3)]
    weights = normalised_weights([1, 2, 3])
    num = den = 0.0
    for m in ("m0", "m1"):
        a = [s[f"{m}.lora_A.weight"].double().numpy() for s in states]
        b = [s[f"{m}.lora_B.weight"].double().numpy() for s in states]
        exact = sum(w * bi @ ai for w, ai, bi in zip(weights, a, b, strict=True))
        approx = sum(w * bi for w, bi in zip(weights, b, strict=True)) @ sum(
            w * ai for w, ai in zip(weights, a, strict=True)
        )
        num += np.linalg.norm(exact - approx) ** 2
        den += np.linalg.norm(exact) ** 2
    assert exactness_error(states, weights) == pytest.approx(np.sqrt(num / den), rel=1e-5)

    shared = {m: torch.randn(3, 5) for m in ("m0", "m1")}
    same_a = [_random_state(s, shared_a=shared) for s in range(3)]
    assert exactness_error(same_a, weights) == pytest.approx(0.0, abs=1e-6)


class QuadraticEvaluator:
    """L(theta) = sign * (||factors||^2 + ||head||^2); product space uses ||Delta W||^2.

    Closed forms: Jensen gap of a convex quadratic = -sum_k w_k ||theta_k - mean||^2 and the
    barrier along a line = sign * -alpha (1 - alpha) ||theta_i - theta_j||^2.
    """

    metric = "accuracy"

    def __init__(self, sign: float) -> None:
        self.sign = sign

    def factor(self, state):
        loss = self.sign * sum(float((v.double() ** 2).sum()) for v in state.values())
        return {"loss": loss, "accuracy": 0.5}

    def product(self, deltas, dense):
        loss = sum(float((d.double() ** 2).sum()) for d in deltas.values())
        loss += sum(float((v.double() ** 2).sum()) for v in dense.values())
        return {"loss": self.sign * loss, "accuracy": 0.5}


def _flat(state):
    return torch.cat([v.double().flatten() for v in state.values()])


def test_jensen_gap_and_barrier_closed_forms():
    states = [_random_state(s) for s in range(3)]
    counts = [10, 20, 70]
    weights = normalised_weights(counts)
    aggregate = weighted_average(states, weights)
    metrics, clients, curves = round_diagnostics(
        states, counts, aggregate, QuadraticEvaluator(sign=-1.0), grid=[0, 0.25, 0.5, 0.75, 1], num_pairs=3, seed=0
    )
    mean = sum(w * _flat(s) for w, s in zip(weights, states, strict=True))
    spread = sum(w * float(((_flat(s) - mean) ** 2).sum()) for w, s in zip(weights, states, strict=True))
    assert metrics["barrier/jensen_factor"] == pytest.approx(spread, rel=1e-5)  # concave: +spread
    expected = max(
        0.25 * float(((_flat(states[i]) - _flat(states[j])) ** 2).sum()) for i, j in [(0, 1), (0, 2), (1, 2)]
    )
    assert metrics["barrier/pairwise_max"] == pytest.approx(expected, rel=1e-5)
    assert len(curves) == 3 and len(clients) == 3


def test_identical_clients_give_zero_gaps(bundle):
    state = get_adapter_state(bundle.model)
    generator = torch.Generator().manual_seed(0)
    trained = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
    evaluator = ServerEvaluator(bundle, bundle.task.server_examples(32), batch_size=16)
    metrics, _, _ = round_diagnostics(
        [trained, trained], [5, 15], trained, evaluator, grid=[0, 0.5, 1], num_pairs=1, seed=0
    )
    for key in (
        "barrier/jensen_factor",
        "barrier/jensen_product",
        "barrier/pairwise_max",
        "barrier/pairwise_max_product",
        "aggregation/exactness_error",
    ):
        assert metrics[key] == pytest.approx(0.0, abs=1e-5), key


def test_product_evaluation_equals_factor_evaluation_and_restores_base(bundle):
    """base + s * B @ A merged into the weights gives the same model as the LoRA path."""
    state = get_adapter_state(bundle.model)
    generator = torch.Generator().manual_seed(1)
    trained = {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
    evaluator = ServerEvaluator(bundle, bundle.task.server_examples(32), batch_size=16)
    base_before = {n: p.detach().clone() for n, p in bundle.model.named_parameters() if "base_layer" in n}
    from copra_core.diagnostics import dense_part, product_deltas

    via_factors = evaluator.factor(trained)
    via_product = evaluator.product(product_deltas(trained), dense_part(trained))
    assert via_product["loss"] == pytest.approx(via_factors["loss"], abs=1e-5)
    assert via_product["accuracy"] == via_factors["accuracy"]
    for name, param in bundle.model.named_parameters():
        if name in base_before:
            assert torch.equal(param, base_before[name]), name


def test_choose_pairs_deterministic_and_distinct():
    assert choose_pairs(4, 2, seed=3) == choose_pairs(4, 2, seed=3)
    pairs = choose_pairs(5, 10, seed=1)
    assert len(set(pairs)) == 10 and all(i < j for i, j in pairs)
