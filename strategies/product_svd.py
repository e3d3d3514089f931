"""Exact product-space averaging re-factorised by truncated SVD (FlexLoRA-style)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from copra_core.adapters import LORA_A, LORA_B
from strategies.base import AdapterState, AggregationRule, ClientUpdate, example_weights


class ProductSVD(AggregationRule):
    """Average the updates ``Delta W_k = B_k A_k`` exactly, then truncate back to rank r.

    ``Delta W = sum_k w_k B_k A_k`` is the exact example-weighted average of the clients'
    updates (factor averaging only approximates it). Its best rank-r approximation
    ``U_r S_r V_r^T`` (Eckart-Young) is split symmetrically, ``B = U_r sqrt(S_r)``,
    ``A = sqrt(S_r) V_r^T``. Non-LoRA tensors (the head) are averaged linearly. FlexLoRA:
    Bai et al. 2024, https://arxiv.org/abs/2402.11505.

    ``last_truncation_error`` holds the relative Frobenius error of the truncation,
    pooled over modules, for the most recent round.
    """

    name = "product_svd"

    def __init__(self) -> None:
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
            module = key[: -len(LORA_A)]
            b_key = module + LORA_B
            rank = reference.shape[0]
            delta = sum(
                w * (u.state[b_key].double() @ u.state[key].double()) for w, u in zip(weights, updates, strict=True)
            )
            u_mat, s_vals, vh = torch.linalg.svd(delta, full_matrices=False)
            root = s_vals[:rank].sqrt()
            out[b_key] = (u_mat[:, :rank] * root).to(current[b_key].dtype)
            out[key] = (root[:, None] * vh[:rank]).to(reference.dtype)
            residual += float((s_vals[rank:] ** 2).sum())
            energy += float((s_vals**2).sum())
        self.last_truncation_error = (residual / energy) ** 0.5 if energy > 0 else 0.0
        return out

    def round_metrics(self) -> dict[str, float]:
        return {"truncation_error": self.last_truncation_error}
