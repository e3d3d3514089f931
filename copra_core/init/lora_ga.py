"""LoRA-GA: initial factors aligned with the full-weight gradient, on an offset base.

Wang et al. 2024, LoRA-GA: Low-Rank Adaptation with Gradient Approximation,
https://arxiv.org/abs/2407.05000 (docs/methods.md#lora-ga). For every adapted weight with
gradient estimate ``G = U S V^T`` (d_out x d_in):

    A0 = V[:, :r]^T * zeta,   B0 = U[:, r:2r] * zeta,   zeta = d_out^(1/4) / sqrt(gamma)

so that the first step's update of ``B A`` spans the best rank-2r approximation of the
full fine-tuning step, and the base becomes ``W0' = W0 - s * B0 A0`` (s = alpha / r, or
alpha / sqrt(r) with rsLoRA) so that the initial model is unchanged. The offset is
returned as ``<module>.init_offset = -B0 A0`` (``copra_core/base_offset.py``); the
server computes it once, from the factors as the clients will receive them, and
broadcasts its bytes, so every client's base is bit-identical.

This is the paper's construction (both factors scaled by zeta, singular values
dropped). PEFT's ``init_lora_weights="lora_ga"`` (direction ``ArB2r``, scale
``stable``) takes the same subspaces but multiplies B by ``S[r:2r]`` and only B by
zeta; ``tests/test_lora_ga.py`` checks the subspaces agree.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from copra_core.adapters import LORA_A, LORA_B, AdapterState, lora_modules
from copra_core.base_offset import INIT_SUFFIX
from copra_core.config import ConfigError

#: Above this many elements the exact SVD is replaced by the randomised one (svd = auto).
EXACT_SVD_MAX_ELEMENTS = 1024 * 1024


def gradient_svd(gradient: torch.Tensor, rank: int, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The leading ``2 * rank`` left and right singular vectors of ``gradient`` (U, V).

    ``lowrank`` is ``torch.svd_lowrank(G, q=4r, niter=4)`` as in the paper's code; it draws
    a random projection from torch's global RNG, so the caller seeds it.
    """
    d_out, d_in = gradient.shape
    _require_rank(rank, d_out, d_in, "a")
    g = gradient.to(torch.float32)
    if method == "exact" or (method == "auto" and g.numel() <= EXACT_SVD_MAX_ELEMENTS):
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        return u[:, : 2 * rank], vh[: 2 * rank].T
    if method not in ("auto", "lowrank"):
        raise ConfigError(f"Config key 'init.svd': unknown method '{method}'")
    u, _, v = torch.svd_lowrank(g, q=min(4 * rank, min(d_out, d_in)), niter=4)
    return u[:, : 2 * rank], v[:, : 2 * rank]


def lora_ga_factors(
    gradient: torch.Tensor, rank: int, gamma: float = 16.0, svd: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) for one weight: ``A0 = V[:, :r]^T zeta`` (r x d_in), ``B0 = U[:, r:2r] zeta`` (d_out x r)."""
    if not torch.isfinite(gradient).all():
        raise ValueError("LoRA-GA: the gradient estimate is not finite")
    u, v = gradient_svd(gradient, rank, svd)
    zeta = gradient.shape[0] ** 0.25 / gamma**0.5
    a0 = (v[:, :rank].T * zeta).contiguous()
    b0 = (u[:, rank : 2 * rank] * zeta).contiguous()
    return a0, b0


def check_rank(state: Mapping[str, torch.Tensor]) -> None:
    """Fail before any gradient is estimated when a module cannot hold ``2r`` directions."""
    for module in lora_modules(state):
        rank, d_in = state[module + LORA_A].shape
        _require_rank(rank, state[module + LORA_B].shape[0], d_in, f"'{module}'")


def _require_rank(rank: int, d_out: int, d_in: int, where: str) -> None:
    if 2 * rank > min(d_out, d_in):
        raise ConfigError(
            f"Config key 'lora.r': LoRA-GA needs 2 * r <= min(d_out, d_in), got r = {rank} for "
            f"{where} ({d_out} x {d_in}) weight"
        )


def lora_ga_state(
    state: Mapping[str, torch.Tensor],
    gradients: Mapping[str, torch.Tensor],
    gamma: float = 16.0,
    svd: str = "auto",
) -> AdapterState:
    """``state`` with every LoRA pair replaced by LoRA-GA's factors from ``gradients[module]``."""
    modules = lora_modules(state)
    missing = sorted(set(modules) - set(gradients))
    if missing:
        raise KeyError(f"LoRA-GA: no gradient estimate for modules {missing[:3]}")
    out = {key: value.clone() for key, value in state.items()}
    for module in modules:
        rank = state[module + LORA_A].shape[0]
        a0, b0 = lora_ga_factors(gradients[module], rank, gamma, svd)
        if a0.shape != state[module + LORA_A].shape or b0.shape != state[module + LORA_B].shape:
            raise ValueError(
                f"LoRA-GA: gradient of '{module}' is {tuple(gradients[module].shape)}, which does not fit "
                f"A {tuple(state[module + LORA_A].shape)} and B {tuple(state[module + LORA_B].shape)}"
            )
        out[module + LORA_A], out[module + LORA_B] = a0, b0
    return out


def init_offsets(state: Mapping[str, torch.Tensor]) -> AdapterState:
    """``<module>.init_offset = -B0 A0`` for every LoRA pair of ``state`` (fp32, computed once).

    Pass the factors as the clients receive them (after the transport dtype's rounding),
    so the offset cancels exactly the initial adapter they train from.
    """
    return {
        module + INIT_SUFFIX: -(state[module + LORA_B].to(torch.float32) @ state[module + LORA_A].to(torch.float32))
        for module in lora_modules(state)
    }
