"""LoRA-FAIR: average the factors, then correct B on the server towards the exact product average."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from copra_core.adapters import LORA_A, LORA_B, lora_modules
from strategies.base import AdapterState, ClientUpdate, example_weights
from strategies.linear import LinearAveraging


def ridge_correction(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    weights: Sequence[float],
    b_bar: torch.Tensor,
    a_bar: torch.Tensor,
    ridge: float,
) -> torch.Tensor:
    """``Delta B = (P - B_bar A_bar) A_bar^T (A_bar A_bar^T + lambda I)^+`` in float64, without forming ``P``.

    ``P = sum_k w_k B_k A_k``; ``P A_bar^T = sum_k w_k B_k (A_k A_bar^T)`` is d_out x r, so
    the cost is O(K r d) and the d_out x d_in product never exists. ``lambda = ridge *
    trace(A_bar A_bar^T) / r`` (``ridge`` times the mean eigenvalue of the Gram matrix), so
    ``ridge`` means the same for every module whatever the scale of its A. The
    pseudo-inverse makes ``ridge = 0`` the least-squares solution even for a
    rank-deficient ``A_bar`` (zero where ``A_bar`` is zero).
    """
    a_bar, b_bar = a_bar.double(), b_bar.double()
    gram = a_bar @ a_bar.T
    projected = sum(w * (b.double() @ (a.double() @ a_bar.T)) for w, (b, a) in zip(weights, factors, strict=True))
    rank = gram.shape[0]
    damping = ridge * float(torch.trace(gram)) / rank
    regularised = gram + damping * torch.eye(rank, dtype=torch.float64)
    return (projected - b_bar @ gram) @ torch.linalg.pinv(regularised, hermitian=True)


class ResidualCorrectedAveraging(LinearAveraging):
    """LoRA-FAIR (ridge form): factor averaging, then B corrected towards ``sum_k w_k B_k A_k``.

    ``A_bar = sum_k w_k A_k`` and ``B_bar = sum_k w_k B_k`` as in ``linear``; then, per LoRA
    module, the server adds a correction ``Delta B`` chosen so that ``(B_bar + Delta B) A_bar``
    is as close as it can be to the exact average update ``P = sum_k w_k B_k A_k`` while
    ``Delta B`` stays small, and sends ``(B_bar + Delta B, A_bar)``: the clients start the next
    round from the corrected factors. No extra traffic; the head is averaged linearly.
    Bian et al. 2025, LoRA-FAIR (ICCV 2025), https://arxiv.org/abs/2411.14961.

    **This is the ridge form, not the paper's exact objective.** The paper states the
    correction as the minimiser of a similarity term between ``P`` and
    ``(B_bar + Delta B) A_bar`` plus a penalty on ``Delta B``. Here the similarity term is
    the squared Frobenius distance and the penalty the squared Frobenius norm,

        Delta B = argmin ||P - (B_bar + Delta B) A_bar||_F^2 + lambda ||Delta B||_F^2
                = (P - B_bar A_bar) A_bar^T (A_bar A_bar^T + lambda I)^{-1},

    whose closed form (``ridge_correction``) needs no solver settings.
    ``Delta B = 0`` is feasible, so the corrected product is never further from ``P`` than
    factor averaging's (``aggregation/aggregate_error <= aggregation/exactness_error`` per
    module); ``ridge = 0`` gives ``P`` projected onto the row space of ``A_bar``, the best any
    B can do with that A.

    ``round_metrics()``: ``correction_norm``, ``||Delta B||_F / ||B_bar||_F`` pooled over modules.

    Parameters
    ----------
    ridge : float
        ``lambda`` relative to the mean eigenvalue of ``A_bar A_bar^T`` (>= 0). Larger keeps
        ``B`` closer to the plain average; 0 is the unregularised least-squares correction.
    """

    name = "lora_fair"
    single_pass = False  # reads the updates twice: the average, then the correction

    def __init__(self, ridge: float = 0.01) -> None:
        if not (math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"option 'ridge' must be a finite number >= 0, got {ridge}")
        self.ridge = ridge
        self.last_correction_norm = 0.0

    def aggregate(self, updates: Sequence[ClientUpdate], current: Mapping[str, torch.Tensor]) -> AdapterState:
        updates = list(updates)
        out = super().aggregate(updates, current)
        weights = example_weights(updates, self.name)
        corrected = averaged = 0.0
        for module in lora_modules(current):
            a_key, b_key = module + LORA_A, module + LORA_B
            factors = [(u.state[b_key], u.state[a_key]) for u in updates]
            # Corrects the fp32 average the clients will receive, not a float64 re-computation of it.
            delta = ridge_correction(factors, weights, out[b_key], out[a_key], self.ridge)
            corrected += float(delta.square().sum())
            averaged += float(out[b_key].double().square().sum())
            out[b_key] = (out[b_key].double() + delta).to(current[b_key].dtype)
        self.last_correction_norm = math.sqrt(corrected / averaged) if averaged > 0 else 0.0
        return out

    def round_metrics(self) -> dict[str, float]:
        return {"correction_norm": self.last_correction_norm}
