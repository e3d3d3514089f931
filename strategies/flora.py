"""FLoRA: merge the exact sum of the clients' updates into the base and start a fresh adapter each round."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from copra_core.adapters import LORA_A, LORA_B, dense_keys, lora_modules
from copra_core.base_offset import SUFFIX
from copra_core.lowrank import weighted_product_sum
from strategies.base import AdapterState, AggregationRule, ClientUpdate, StrategyContractError, example_weights

#: Seeds of different runs stay apart for this many rounds (seed * SEED_STRIDE + round).
SEED_STRIDE = 1_000_003


class StackedMerge(AggregationRule):
    """FLoRA: the stacked factors' exact product merged into the base; a fresh adapter each round.

    Stacking ``B_s = [w_1 B_1, ..., w_K B_K]`` (d_out x K r) and ``A_s = [A_1; ...; A_K]``
    (K r x d_in) represents the exact average update, ``B_s A_s = sum_k w_k B_k A_k``, at
    rank K r. FLoRA merges it into the frozen base and
    gives the clients a new adapter every round; with the offset accumulated over rounds,

        R_{t+1} = R_t + sum_k w_k B_k A_k,   B_{t+1} = 0,   A_{t+1} ~ U(-1/sqrt(d_in), 1/sqrt(d_in)),

    the global model ``W0 + s (R_{t+1} + B_{t+1} A_{t+1}) = W0 + s R_{t+1}`` is exactly the
    average of the clients' models ``W0 + s (R_t + B_k A_k)``: the aggregate error is 0 by
    construction (``aggregation/aggregate_error`` ~ 1e-7, fp32). The head is averaged
    linearly. Wang et al. 2024, FLoRA (NeurIPS 2024), https://arxiv.org/abs/2409.05976.

    The merged update travels as the shared base offset of ``residual`` (FedEx-LoRA):
    full d_out x d_in per module, fp32, applied by every client to its original weights
    (``copra_core/base_offset.py``; ``base_offset.safetensors`` next to the exported
    adapter). FLoRA itself sends the stacked factors, K r (d_out + d_in) numbers per
    module, and lets each client multiply them out: the same model, different downlink
    bytes (``comm/bytes_down`` shows this implementation's). The fresh A is PEFT's default
    LoRA initialisation (Kaiming-uniform, bound ``1/sqrt(d_in)``), drawn from a generator
    seeded with ``seed * 1_000_003 + round``, so a resumed run draws the same adapters;
    ``B = 0`` makes the fresh adapter's product zero.

    ``round_metrics()``: ``merged_norm``, ``||sum_k w_k B_k A_k||_F`` pooled over modules.

    Parameters
    ----------
    seed : int
        Seeds the re-initialised A of every round.
    """

    name = "flora"

    def __init__(self, seed: int = 0) -> None:
        if seed < 0:
            raise ValueError(f"option 'seed' must be >= 0, got {seed}")
        self.seed = seed
        #: ``<module>.base_offset`` -> the accumulated merged updates, fp32.
        self.offsets: AdapterState = {}
        #: Rounds aggregated so far (seeds the fresh adapter; checkpointed).
        self.rounds = 0
        self.last_merged_norm = 0.0

    def aggregate(self, updates: Sequence[ClientUpdate], current: Mapping[str, torch.Tensor]) -> AdapterState:
        updates = list(updates)
        weights = example_weights(updates, self.name)
        self.rounds += 1
        out: AdapterState = {
            key: sum(w * u.state[key].to(torch.float32) for w, u in zip(weights, updates, strict=True)).to(
                current[key].dtype
            )
            for key in dense_keys(current)
        }
        generator = torch.Generator().manual_seed(self.seed * SEED_STRIDE + self.rounds)
        squares = 0.0
        for module in lora_modules(current):
            a_key, b_key, offset_key = module + LORA_A, module + LORA_B, module + SUFFIX
            merged = weighted_product_sum(((u.state[b_key], u.state[a_key]) for u in updates), weights)
            previous = self.offsets.get(offset_key, torch.zeros_like(merged, dtype=torch.float32)).double()
            self.offsets[offset_key] = (previous + merged).float()
            squares += float(merged.square().sum())
            rank, d_in = current[a_key].shape
            bound = 1.0 / math.sqrt(d_in)
            fresh = torch.empty(rank, d_in, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            out[a_key] = fresh.to(current[a_key].dtype)
            out[b_key] = torch.zeros_like(current[b_key])
        self.last_merged_norm = math.sqrt(squares)
        return {key: out[key] for key in current}

    def base_offset(self) -> AdapterState:
        return self.offsets

    def round_metrics(self) -> dict[str, float]:
        return {"merged_norm": self.last_merged_norm}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.offsets, "rounds": torch.tensor(self.rounds, dtype=torch.int64)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = sorted(k for k in state if k != "rounds" and not k.endswith(SUFFIX))
        if "rounds" not in state or unknown:
            raise StrategyContractError(
                f"strategy {self.name}: expected 'rounds' and '<module>{SUFFIX}' offsets, got {sorted(state)[:3]}"
            )
        self.rounds = int(state["rounds"])
        self.offsets = {k: v.to(torch.float32).clone() for k, v in state.items() if k.endswith(SUFFIX)}
