"""The shared low-rank maths (copra_core/lowrank.py) against numpy's dense computation."""

import numpy as np
import pytest
import torch

import strategies
from copra_core.config import ConfigError
from copra_core.lowrank import qr_truncated_factors, truncated_factors, weighted_product_sum
from strategies.base import ClientUpdate


def _factors(seed: int, ranks: list[int], d_out: int = 24, d_in: int = 17) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g)) for r in ranks]


def _weights(count: int) -> list[float]:
    raw = [3.0 + 7 * k for k in range(count)]
    return [w / sum(raw) for w in raw]


def _numpy_best(factors, weights, rank):
    """Exact average in float64 numpy, its best rank-r approximation, cut and total energy."""
    exact = sum(w * (b.double().numpy() @ a.double().numpy()) for w, (b, a) in zip(weights, factors, strict=True))
    u, s, vh = np.linalg.svd(exact, full_matrices=False)
    return exact, (u[:, :rank] * s[:rank]) @ vh[:rank], float((s[rank:] ** 2).sum()), float((s**2).sum())


def _rank_deficient(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Clients that share A (the product has rank <= r) and one whose B has a zero column."""
    factors = _factors(seed, [4, 4, 4])
    shared_a = factors[0][1]
    factors = [(b, shared_a.clone()) for b, _ in factors]
    factors[2][0][:, 1] = 0.0
    return factors


CASES = {
    "one client": (_factors(0, [4]), 4),
    "eight clients": (_factors(1, [4] * 8), 4),
    "mixed ranks": (_factors(2, [1, 2, 4, 3]), 4),
    "sum of ranks above d": (_factors(3, [8] * 5), 6),  # R = 40 > d_out = 24 > d_in = 17
    "rank deficient": (_rank_deficient(4), 4),
    "duplicate clients": (_factors(5, [4]) * 3, 4),
}


@pytest.mark.parametrize("case", CASES)
def test_qr_path_equals_the_dense_svd_path(case):
    factors, rank = CASES[case]
    weights = _weights(len(factors))
    exact, best, cut, total = _numpy_best(factors, weights, rank)
    dense_sum = weighted_product_sum(factors, weights)
    np.testing.assert_allclose(dense_sum.numpy(), exact, rtol=1e-12, atol=1e-12)
    scale = np.linalg.norm(best)
    for path in ("dense", "qr"):
        if path == "dense":
            b, a, got_cut, got_total = truncated_factors(dense_sum, rank)
        else:
            b, a, got_cut, got_total = qr_truncated_factors(factors, weights, rank)
        assert b.shape == (exact.shape[0], rank) and a.shape == (rank, exact.shape[1])
        relative = np.linalg.norm((b @ a).numpy() - best) / scale
        assert relative < 1e-5, f"{path}: {relative:.1e}"
        assert got_total == pytest.approx(total, rel=1e-5)
        assert got_cut == pytest.approx(cut, rel=1e-5, abs=1e-9 * total)
        # The split is symmetric: B^T B = A A^T = S_r.
        torch.testing.assert_close(b.T @ b, a @ a.T, rtol=1e-6, atol=1e-9)


def test_qr_path_zero_pads_when_the_average_has_fewer_than_r_singular_values():
    factors = _factors(6, [2, 2], d_out=3, d_in=2)  # min(d_out, d_in) = 2 < r = 5
    weights = _weights(2)
    exact, _, _, _ = _numpy_best(factors, weights, 5)
    for b, a, cut, _ in (
        truncated_factors(weighted_product_sum(factors, weights), 5),
        qr_truncated_factors(factors, weights, 5),
    ):
        assert b.shape == (3, 5) and a.shape == (5, 2)
        assert torch.count_nonzero(b[:, 2:]) == 0 and torch.count_nonzero(a[2:]) == 0
        np.testing.assert_allclose((b @ a).numpy(), exact, rtol=1e-10, atol=1e-12)
        assert cut == 0.0


def test_weighted_product_sum_keeps_the_factors_precision_when_asked():
    factors = _factors(7, [3, 3])
    in_fp32 = weighted_product_sum(factors, [0.25, 0.75], dtype=None)
    assert in_fp32.dtype == torch.float32
    torch.testing.assert_close(in_fp32, 0.25 * (factors[0][0] @ factors[0][1]) + 0.75 * (factors[1][0] @ factors[1][1]))
    with pytest.raises(ValueError, match="at least one"):
        weighted_product_sum([], [])
    with pytest.raises(ValueError, match="at least one"):
        qr_truncated_factors([], [], 2)


def _updates(factors_per_client, module="m"):
    g = torch.Generator().manual_seed(11)
    head = torch.randn(2, 3, generator=g)
    return [
        ClientUpdate(
            node_id=k,
            state={f"{module}.lora_B.weight": b, f"{module}.lora_A.weight": a, "head.weight": head + k},
            num_examples=10 + 5 * k,
        )
        for k, (b, a) in enumerate(factors_per_client)
    ]


@pytest.mark.parametrize(("spec", "options"), [("product_svd", ""), ("masked", "rank-merge=product")])
def test_rules_with_svd_qr_match_their_dense_default(spec, options):
    """The rules' ``svd=qr`` option gives the dense default's adapter, to rounding."""
    updates = _updates(_factors(8, [4] * 6))
    current = {k: torch.zeros_like(v) for k, v in updates[0].state.items()}
    dense_rule = strategies.build(spec, options)
    qr_rule = strategies.build(spec, ", ".join(filter(None, [options, "svd=qr"])))
    assert dense_rule.svd == "dense" and qr_rule.svd == "qr"
    dense, qr = dense_rule.aggregate(updates, current), qr_rule.aggregate(updates, current)
    product = {name: out["m.lora_B.weight"] @ out["m.lora_A.weight"] for name, out in (("dense", dense), ("qr", qr))}
    relative = torch.linalg.matrix_norm(product["qr"] - product["dense"]) / torch.linalg.matrix_norm(product["dense"])
    assert relative < 1e-5
    torch.testing.assert_close(qr["head.weight"], dense["head.weight"], rtol=0, atol=0)
    assert qr_rule.round_metrics()["truncation_error"] == pytest.approx(
        dense_rule.round_metrics()["truncation_error"], rel=1e-5
    )
    with pytest.raises(ConfigError, match=r"option 'svd' must be one of \('dense', 'qr'\), got 'lapack'"):
        strategies.build(spec, ", ".join(filter(None, [options, "svd=lapack"])))


def test_masked_product_with_svd_qr_matches_dense_on_partial_mixed_rank_replies():
    """HeteroLoRA replies: module m1 trained by clients 0 and 2 at ranks 4 and 2, m2 by nobody."""
    g = torch.Generator().manual_seed(12)
    current = {
        "m1.lora_A.weight": torch.randn(4, 9, generator=g),
        "m1.lora_B.weight": torch.randn(7, 4, generator=g),
        "m2.lora_A.weight": torch.randn(4, 5, generator=g),
        "m2.lora_B.weight": torch.randn(6, 4, generator=g),
        "head.weight": torch.randn(3, generator=g),
    }
    ranks = {0: 4, 1: None, 2: 2}
    updates = []
    for k, r in ranks.items():
        state = {"head.weight": torch.randn(3, generator=g)}
        if r is not None:
            state |= {
                "m1.lora_A.weight": torch.randn(r, 9, generator=g),
                "m1.lora_B.weight": torch.randn(7, r, generator=g),
            }
        updates.append(ClientUpdate(node_id=k, state=state, num_examples=10 * (k + 1)))
    dense_rule = strategies.build("masked", "rank-merge=product")
    qr_rule = strategies.build("masked", "rank-merge=product, svd=qr")
    dense, qr = dense_rule.aggregate(updates, current), qr_rule.aggregate(updates, current)
    trainers = [u for u in updates if "m1.lora_A.weight" in u.state]
    total = sum(u.num_examples for u in trainers)
    exact = sum(
        u.num_examples / total * (u.state["m1.lora_B.weight"].double() @ u.state["m1.lora_A.weight"].double())
        for u in trainers
    )
    for out in (dense, qr):  # rank 6 of the exact average >= r = 4: compare with numpy's best rank 4
        u_np, s_np, vh_np = np.linalg.svd(exact.numpy())
        best = (u_np[:, :4] * s_np[:4]) @ vh_np[:4]
        got = (out["m1.lora_B.weight"].double() @ out["m1.lora_A.weight"].double()).numpy()
        assert np.linalg.norm(got - best) / np.linalg.norm(best) < 1e-5
        for key in ("m2.lora_A.weight", "m2.lora_B.weight"):  # nobody trained m2: kept as it was
            assert torch.equal(out[key], current[key])
    torch.testing.assert_close(qr["head.weight"], dense["head.weight"], rtol=0, atol=0)
