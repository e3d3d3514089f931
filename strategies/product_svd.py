"""Exact product-space averaging re-factorised by truncated SVD (FlexLoRA-style)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from copra_core.adapters import LORA_A, LORA_B
from copra_core.lowrank import (
    qr_truncated_factors,
    relative_truncation_error,
    truncated_factors,
    weighted_product_sum,
)
from strategies.base import AdapterState, AggregationRule, ClientUpdate, example_weights

#: How the truncated SVD of the exact average is computed (``copra_core/lowrank.py``).
SVD_METHODS = ("dense", "qr")


class ProductSVD(AggregationRule):
    """Average the updates ``Delta W_k = B_k A_k`` exactly, then truncate back to rank r.

    ``Delta W = sum_k w_k B_k A_k`` is the exact example-weighted average of the clients'
    updates (factor averaging only approximates it). Its best rank-r approximation
    ``U_r S_r V_r^T`` (Eckart-Young) is split symmetrically, ``B = U_r sqrt(S_r)``,
    ``A = sqrt(S_r) V_r^T``. Non-LoRA tensors (the head) are averaged linearly. FlexLoRA:
    Bai et al. 2024, https://arxiv.org/abs/2402.11505.

    ``last_truncation_error`` holds the relative Frobenius error of the truncation,
    pooled over modules, for the most recent round.

    Parameters
    ----------
    svd : str
        ``dense`` forms the d_out x d_in matrix ``Delta W`` and takes its SVD; ``qr`` gets
        the same factors from QR factorisations of the stacked client factors and the SVD
        of a small (K r) x (K r) core, never forming ``Delta W`` (``copra_core/lowrank.py``;
        faster and smaller while K r is below d, ``docs/results/aggregation.md``). The two
        agree to rounding, not bitwise, so the default stays ``dense``: runs and benchmark
        caches made before ``qr`` existed reproduce bit for bit.
    """

    name = "product_svd"

    def __init__(self, svd: str = "dense") -> None:
        if svd not in SVD_METHODS:
            raise ValueError(f"option 'svd' must be one of {SVD_METHODS}, got '{svd}'")
        self.svd = svd
        self.last_truncation_error = 0.0

    def aggregate(self, updates: Sequence[ClientUpdate], current: Mapping[str, torch.Tensor]) -> AdapterState:
        weights = example_weights(updates, self.name)
        out: AdapterState = {}
        residual = energy = 0.0
        for key, reference in current.items():
            if key.endswith(LORA_B):
                continue
            if not key.endswith(LORA_A):
                out[key] = sum(w * u.state[key].to(torch.float32) for w, u in zip(weights, updates, strict=True))
                out[key] = out[key].to(reference.dtype)
                continue
            b_key = key[: -len(LORA_A)] + LORA_B
            factors = [(u.state[b_key], u.state[key]) for u in updates]
            rank = reference.shape[0]
            if self.svd == "qr":
                b, a, cut, total = qr_truncated_factors(factors, weights, rank)
            else:
                b, a, cut, total = truncated_factors(weighted_product_sum(factors, weights), rank)
            out[b_key], out[key] = b.to(current[b_key].dtype), a.to(reference.dtype)
            residual, energy = residual + cut, energy + total
        self.last_truncation_error = relative_truncation_error(residual, energy)
        return out

    def round_metrics(self) -> dict[str, float]:
        return {"truncation_error": self.last_truncation_error}
