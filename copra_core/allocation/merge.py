"""Mask- and rank-aware averaging of partial client adapters.

Every client reply holds the dense tensors (the head) and only the LoRA modules it
trained, at its own rank r_k <= r. A module is averaged over the clients that trained it,
weighted by their example counts, renormalised over those clients; a module nobody trained
keeps its previous value. Nothing is zero-filled and then averaged.

Two ways to combine different ranks (``strategy.options = "rank-merge=..."``):

* ``padding`` (factor space, HeteroLoRA of Cho et al. 2024,
  https://arxiv.org/abs/2401.06432): component j of a module (row j of A, column j of B)
  is averaged over the clients whose rank exceeds j; a component nobody trained keeps its
  previous value. With equal ranks and full participation this is FedAvg on the factors.
* ``product`` (FlexLoRA, Bai et al. 2024, https://arxiv.org/abs/2402.11505): the exact
  average of the clients' products ``B_k A_k``, re-factorised at rank r by truncated SVD.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from copra_core.adapters import LORA_A, LORA_B, AdapterState, dense_keys, lora_modules

Partial = tuple[Mapping[str, torch.Tensor], float]  # (partial adapter, example count)


def _dense_average(updates: Sequence[Partial], current: Mapping[str, torch.Tensor]) -> AdapterState:
    total = sum(n for _, n in updates)
    if total <= 0:
        raise ValueError("masked averaging: the updates' num-examples sum to zero")
    return {key: sum(s[key].to(torch.float32) * (n / total) for s, n in updates) for key in dense_keys(current)}


def trained_by(updates: Sequence[Partial], module: str) -> list[Partial]:
    return [(s, n) for s, n in updates if module + LORA_A in s]


def pad_average(updates: Sequence[Partial], current: Mapping[str, torch.Tensor]) -> AdapterState:
    """Component-wise average over the clients that trained each component (``padding``)."""
    out = {k: v.to(torch.float32).clone() for k, v in current.items()}
    out.update(_dense_average(updates, current))
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


def product_average(
    updates: Sequence[Partial], current: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], AdapterState]:
    """(exact per-module average of ``B_k A_k`` over the clients that trained it, dense average).

    A module nobody trained contributes its current product ``B A``.
    """
    deltas: dict[str, torch.Tensor] = {}
    for module in lora_modules(current):
        a_key, b_key = module + LORA_A, module + LORA_B
        trained = trained_by(updates, module)
        if not trained:
            deltas[module] = current[b_key].double() @ current[a_key].double()
            continue
        total = sum(n for _, n in trained)
        deltas[module] = sum((n / total) * (s[b_key].double() @ s[a_key].double()) for s, n in trained)
    return {m: d.float() for m, d in deltas.items()}, _dense_average(updates, current)


def factorise(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``rank`` factors ``(B, A)`` of ``delta`` (split sqrt(S) both ways), residual and energy."""
    u_mat, s_vals, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = s_vals[:rank].sqrt()
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    kept = root.shape[0]
    b[:, :kept] = u_mat[:, :rank] * root
    a[:kept] = root[:, None] * vh[:rank]
    return b.float(), a.float(), float((s_vals[rank:] ** 2).sum()), float((s_vals**2).sum())
