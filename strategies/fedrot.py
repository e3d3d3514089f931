"""FedRot-LoRA: rotate every client's factors onto a shared reference, then average them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from copra_core.adapters import LORA_A, LORA_B, lora_modules
from strategies.base import AdapterState, ClientUpdate, StrategyContractError
from strategies.linear import LinearAveraging

#: Which factor is aligned to the reference (``alternate``: B in rounds 3, 5, ..., A in the others).
ALIGN_MODES = ("alternate", "A", "B")


def procrustes_rotation(rows: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The orthogonal ``R`` (r x r) minimising ``||R^T rows - reference||_F`` (orthogonal Procrustes).

    ``rows`` and ``reference`` are r x d. With ``rows reference^T = U S V^T`` the minimiser is
    ``R = U V^T`` (Schönemann 1966). Computed in float64; a reflection is allowed, as in the
    authors' hard alignment.
    """
    u_mat, _, vh = torch.linalg.svd(rows.double() @ reference.double().T)
    return u_mat @ vh


class RotationAlignedAveraging(LinearAveraging):
    """FedRot-LoRA: rotate each client's factors onto the global adapter (Procrustes), then average.

    A LoRA update is unchanged by an orthogonal ``R`` of its rank space,
    ``(B_k R)(R^T A_k) = B_k A_k``, but clients trained apart drift into different ``R``'s,
    and averaging misaligned factors destroys part of the update. Before averaging, the
    server aligns every client to the reference the clients started from (the current
    global adapter) by orthogonal Procrustes on one factor:

    * ``A`` aligned: ``R_k = argmin_{R^T R = I} ||R^T A_k - A_ref||_F = U V^T`` with
      ``A_k A_ref^T = U S V^T``;
    * ``B`` aligned: ``R_k = argmin ||B_k R - B_ref||_F = U V^T`` with ``B_k^T B_ref = U S V^T``;

    then ``A_k <- R_k^T A_k``, ``B_k <- B_k R_k`` (every client's product is unchanged) and
    ``A = sum_k w_k A_k``, ``B = sum_k w_k B_k`` as in ``linear``; the head is averaged
    linearly. When the clients' factors are rotations of one another the aligned average is
    exact. Same traffic as ``linear``. Zhang et al. 2026, FedRot-LoRA,
    https://arxiv.org/abs/2602.23638 (code: https://github.com/haoran-zh/FedRot-LoRA).

    The authors align on the clients against the global adapter they received, alternating
    between A and B from round to round and skipping the first round; here the server does
    it (it holds the same reference) and already aligns in round 1: on A, which every
    client started from. A factor whose reference is all zeros (B before any round) carries
    no orientation: that module is then averaged without rotation. The authors' soft
    variant (interpolating ``R`` towards the identity) is not implemented.

    ``round_metrics()``: ``rotation_distance``, the mean ``||R_k - I||_F`` over clients and
    modules (0: the clients were aligned already).

    Parameters
    ----------
    align : str
        ``alternate`` (the authors' schedule: A in round 2, 4, ..., B in rounds 3, 5, ...; A in
        round 1), ``A`` or ``B``.
    """

    name = "fedrot"
    single_pass = False  # rotates every update before the average reads it

    def __init__(self, align: str = "alternate") -> None:
        if align not in ALIGN_MODES:
            raise ValueError(f"option 'align' must be one of {ALIGN_MODES}, got '{align}'")
        self.align = align
        #: Rounds aggregated so far (the alternating schedule's clock; checkpointed).
        self.rounds = 0
        self.last_rotation_distance = 0.0

    def aligned_factor(self, round_number: int) -> str:
        """``A`` or ``B``: the factor aligned in round ``round_number`` (1-based)."""
        if self.align != "alternate":
            return self.align
        return "B" if round_number % 2 == 1 and round_number > 1 else "A"

    def aggregate(self, updates: Sequence[ClientUpdate], current: Mapping[str, torch.Tensor]) -> AdapterState:
        updates = list(updates)
        self.rounds += 1
        factor = self.aligned_factor(self.rounds)
        states = [dict(u.state) for u in updates]  # shallow copies: rotated tensors replace, never overwrite
        distances: list[float] = []
        for module in lora_modules(current):
            a_key, b_key = module + LORA_A, module + LORA_B
            # Rows of the factor being aligned: A is r x d_in, B^T is r x d_out.
            reference = current[a_key] if factor == "A" else current[b_key].T
            if not torch.any(reference != 0):
                continue  # nothing to align to: a zero reference has no orientation
            identity = torch.eye(reference.shape[0], dtype=torch.float64)
            for state in states:
                b, a = state[b_key].double(), state[a_key].double()
                rotation = procrustes_rotation(a if factor == "A" else b.T, reference)
                state[b_key], state[a_key] = b @ rotation, rotation.T @ a
                distances.append(float(torch.linalg.matrix_norm(rotation - identity)))
        self.last_rotation_distance = sum(distances) / len(distances) if distances else 0.0
        rotated = [replace(u, state=s) for u, s in zip(updates, states, strict=True)]
        return super().aggregate(rotated, current)

    def round_metrics(self) -> dict[str, float]:
        return {"rotation_distance": self.last_rotation_distance}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rounds": torch.tensor(self.rounds, dtype=torch.int64)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != {"rounds"}:
            raise StrategyContractError(
                f"strategy {self.name}: expected the state {{'rounds'}}, got {sorted(state)[:3]}"
            )
        self.rounds = int(state["rounds"])
