"""Low-rank maths shared by the aggregation rules, the HeteroLoRA merge and the diagnostics.

A LoRA module's update is the product ``B A`` (``B`` d_out x r, ``A`` r x d_in). The exact
average of the clients' updates is ``sum_k w_k B_k A_k``; averaging the factors separately
only approximates it. This module holds, once, the operations built on that average:

* ``weighted_product_sum``: the dense ``sum_k w_k B_k A_k`` (rules that need the full
  matrix: the residual folded into the base, the diagnostics' product-space evaluations);
* ``truncated_factors``: its best rank-r factors by SVD (Eckart-Young), split
  ``B = U sqrt(S)``, ``A = sqrt(S) V^T``;
* ``qr_truncated_factors``: the same factors from the stacked client factors through two
  thin QR factorisations and an SVD of a small (sum r_k) x (sum r_k) core, never forming
  the d_out x d_in product;
* the masked averages of partial, mixed-rank adapters (HeteroLoRA allocation):
  ``pad_average`` (factor space), ``masked_product_average`` (product space).

Plain torch only: the rules import it without PEFT, transformers or Flower.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from copra_core.adapters import LORA_A, LORA_B, AdapterState, dense_keys, lora_modules

#: One client's factors of one module: (B d_out x r_k, A r_k x d_in).
Factors = tuple[torch.Tensor, torch.Tensor]
#: One client's partial adapter and its example count (HeteroLoRA allocation replies).
Partial = tuple[Mapping[str, torch.Tensor], float]
#: The result of a re-factorisation: (B, A, squared Frobenius norm cut off, squared norm in all).
Truncation = tuple[torch.Tensor, torch.Tensor, float, float]


# ---------------------------------------------------------------------- product average
def weighted_product_sum(
    factors: Iterable[Factors], weights: Iterable[float], *, dtype: torch.dtype | None = torch.float64
) -> torch.Tensor:
    """``sum_k w_k B_k A_k`` as a dense d_out x d_in matrix.

    Each product is formed in ``dtype`` (``None``: the factors' own dtype), multiplied by
    its weight and added in the order given, so callers that passed the same factors in
    the same order get bitwise the same matrix.
    """
    # A generator, so one product is alive at a time besides the running sum; sum() starting
    # from 0, as every caller did before this module existed (0 + x turns a -0.0 entry into
    # +0.0), so results stay bitwise those of earlier runs.
    total = sum(
        w * (b @ a if dtype is None else b.to(dtype) @ a.to(dtype)) for w, (b, a) in zip(weights, factors, strict=True)
    )
    if not isinstance(total, torch.Tensor):
        raise ValueError("weighted_product_sum needs at least one client's factors")
    return total


def truncated_factors(delta: torch.Tensor, rank: int) -> Truncation:
    """Best rank-``rank`` factors of ``delta`` by a float64 SVD, ``sqrt(S)`` split both ways.

    Returns float64 ``(B, A, residual, energy)``: ``B`` d_out x rank, ``A`` rank x d_in
    (zero-padded where ``delta`` has fewer than ``rank`` singular values),
    ``residual = sum_{i >= rank} s_i^2`` (what the truncation cuts off) and
    ``energy = sum_i s_i^2`` (``||delta||_F^2``).
    """
    u_mat, s_vals, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return _split(u_mat, s_vals, vh, rank, delta.shape)


def qr_truncated_factors(factors: Sequence[Factors], weights: Sequence[float], rank: int) -> Truncation:
    """``truncated_factors(weighted_product_sum(factors, weights), rank)`` without the dense product.

    With the stacked factors ``B_s = [w_1 B_1, ..., w_K B_K]`` (d_out x R) and
    ``A_s = [A_1; ...; A_K]`` (R x d_in), ``R = sum_k r_k``, the exact average is
    ``B_s A_s``. Thin QR factorisations ``B_s = Q_B R_B`` and ``A_s^T = Q_A R_A`` give
    ``B_s A_s = Q_B (R_B R_A^T) Q_A^T``; the SVD ``R_B R_A^T = U S V^T`` of that small core
    is then an SVD of the average, ``(Q_B U) S (Q_A V)^T``, because ``Q_B`` and ``Q_A``
    have orthonormal columns. Cost O((d_out + d_in) R^2 + R^3) instead of the dense
    O(d_out d_in R) product and O(d_out d_in min(d_out, d_in)) SVD; memory O((d_out + d_in) R)
    instead of O(d_out d_in). The singular values, hence ``residual`` and ``energy``, are
    those of the dense path; the factors agree with it to rounding (not bitwise: the
    operations differ), and where singular values tie, only up to a rotation within them.
    """
    if not factors:
        raise ValueError("qr_truncated_factors needs at least one client's factors")
    b_stack = torch.cat([w * b.double() for w, (b, _) in zip(weights, factors, strict=True)], dim=1)
    a_stack = torch.cat([a.double() for _, a in factors], dim=0)
    q_b, r_b = torch.linalg.qr(b_stack)  # reduced: Q_B d_out x min(d_out, R)
    q_a, r_a = torch.linalg.qr(a_stack.T)  # Q_A d_in x min(d_in, R)
    u_core, s_vals, vh_core = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    # Only the leading ``rank`` singular vectors are mapped back to d_out and d_in.
    u_top, vh_top = q_b @ u_core[:, :rank], vh_core[:rank] @ q_a.T
    return _split(u_top, s_vals, vh_top, rank, (b_stack.shape[0], a_stack.shape[1]))


def _split(
    u_mat: torch.Tensor, s_vals: torch.Tensor, vh: torch.Tensor, rank: int, shape: tuple[int, int] | torch.Size
) -> Truncation:
    """``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``, zero-padded to ``rank``; residual and energy."""
    root = s_vals[:rank].sqrt()
    kept = root.shape[0]
    b = torch.zeros(shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, shape[1], dtype=torch.float64)
    b[:, :kept] = u_mat[:, :rank] * root
    a[:kept] = root[:, None] * vh[:rank]
    return b, a, float((s_vals[rank:] ** 2).sum()), float((s_vals**2).sum())


def relative_truncation_error(residual: float, energy: float) -> float:
    """``sqrt(residual / energy)``, pooled sums over modules; 0 when there is nothing to cut."""
    return (residual / energy) ** 0.5 if energy > 0 else 0.0


# ---------------------------------------------------------------------- masked (partial) averages
def dense_average(updates: Sequence[Partial], current: Mapping[str, torch.Tensor]) -> AdapterState:
    """Example-weighted average of the non-LoRA tensors (the head), which every client sends."""
    total = sum(n for _, n in updates)
    if total <= 0:
        raise ValueError("masked averaging: the updates' num-examples sum to zero")
    return {key: sum(s[key].to(torch.float32) * (n / total) for s, n in updates) for key in dense_keys(current)}


def trained_by(updates: Sequence[Partial], module: str) -> list[Partial]:
    """The replies that hold ``module`` (the clients that trained it)."""
    return [(s, n) for s, n in updates if module + LORA_A in s]


def pad_average(updates: Sequence[Partial], current: Mapping[str, torch.Tensor]) -> AdapterState:
    """Component-wise average over the clients that trained each component (``padding``).

    Component j of a module (row j of A, column j of B) is averaged over the clients whose
    rank exceeds j; a component nobody trained keeps its previous value.
    """
    out = {k: v.to(torch.float32).clone() for k, v in current.items()}
    out.update(dense_average(updates, current))
    for module in lora_modules(current):
        a_key, b_key = module + LORA_A, module + LORA_B
        rank, d_in = current[a_key].shape
        sum_a = torch.zeros(rank, d_in)
        sum_b = torch.zeros_like(out[b_key])
        weight = torch.zeros(rank, dtype=torch.float64)
        for state, n in trained_by(updates, module):
            r_k = state[a_key].shape[0]
            sum_a[:r_k] += n * state[a_key].to(torch.float32)
            sum_b[:, :r_k] += n * state[b_key].to(torch.float32)
            weight[:r_k] += n
        seen = weight > 0  # components nobody trained keep their previous value
        if seen.any():
            w = weight[seen].to(torch.float32)
            out[a_key][seen] = sum_a[seen] / w[:, None]
            out[b_key][:, seen] = sum_b[:, seen] / w[None, :]
    return out


def trainer_factors(updates: Sequence[Partial], module: str) -> tuple[list[Factors], list[float]]:
    """The factors of ``module`` from the clients that trained it, with weights renormalised over them."""
    trained = trained_by(updates, module)
    total = sum(n for _, n in trained)
    return [(s[module + LORA_B], s[module + LORA_A]) for s, _ in trained], [n / total for _, n in trained]


def masked_product_average(
    updates: Sequence[Partial], current: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], AdapterState]:
    """(exact per-module average of ``B_k A_k`` over the clients that trained it, fp32; dense average).

    A module nobody trained contributes its current product ``B A``.
    """
    deltas: dict[str, torch.Tensor] = {}
    for module in lora_modules(current):
        factors, weights = trainer_factors(updates, module)
        if factors:
            deltas[module] = weighted_product_sum(factors, weights)
        else:
            deltas[module] = current[module + LORA_B].double() @ current[module + LORA_A].double()
    return {m: d.float() for m, d in deltas.items()}, dense_average(updates, current)
