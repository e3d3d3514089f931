"""CopRA: progressive LoRA training with random transformer-block dropping.

Each transformer block is a player; training on random coalitions of blocks optimises
every block's average marginal contribution, which makes adapters that merge well and
survive pruning. Paper: https://arxiv.org/abs/2410.22911 (published as CoTo, ICML 2025).

Mechanics (docs/methods.md#copra):
* p(s) = min(p0 + (1 - p0) * s / full_at, 1) at GLOBAL progress s in [0, 1];
* one Bernoulli(p) draw per block per optimizer step, shared by all LoRA modules of
  the block; at least one block active; no rescaling of active adapters;
* a dropped block keeps its frozen base weights, only its LoRA delta is skipped, so its
  LoRA factors receive no gradient (``None``) and AdamW leaves them untouched that step.
  An initialisation that offsets the base to cancel its initial adapter (LoRA-GA) is
  dropped with the adapter (``BaseOffsets.follow_adapter``): a dropped block is the
  pre-trained block, as in CopRA without such an initialisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from peft.tuners.lora import LoraLayer

from copra_core.base_offset import BaseOffsets


def activation_probability(progress: float, p0: float, full_at: float = 0.75) -> float:
    """Probability that a block's adapter is active at global training progress ``progress``."""
    progress = min(max(progress, 0.0), 1.0)
    return min(p0 + (1.0 - p0) * progress / full_at, 1.0)


def global_progress(server_round: int, step: int, num_rounds: int, local_steps: int) -> float:
    """Progress of the whole federated run at local ``step`` (0-based) of ``server_round`` (1-based).

    Global, not per-call: a client's local schedule must not restart every round.
    """
    return ((server_round - 1) * local_steps + step) / (num_rounds * local_steps)


def sample_block_mask(num_blocks: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli(p) mask over blocks with at least one block active."""
    mask = torch.rand(num_blocks, generator=generator) < p
    if not mask.any():
        # Keep one block: pick it uniformly so no block is favoured.
        mask[torch.randint(num_blocks, (1,), generator=generator)] = True
    return mask


def set_block_adapters(
    blocks: Sequence[Sequence[LoraLayer]], mask: torch.Tensor, base_offsets: BaseOffsets | None = None
) -> None:
    """Enable the LoRA delta of block i iff ``mask[i]`` (and its initialisation offset, if any).

    Sets PEFT's ``_disable_adapters`` flag (what ``LoraLayer.forward`` reads) directly:
    ``enable_adapters()`` would also flip ``requires_grad``, which would fight
    initialisations that freeze a factor.
    """
    for layers, active in zip(blocks, mask.tolist(), strict=True):
        for layer in layers:
            layer._disable_adapters = not active
            if base_offsets is not None:
                base_offsets.follow_adapter(layer, active)


@contextlib.contextmanager
def all_blocks_active(blocks: Sequence[Sequence[LoraLayer]], base_offsets: BaseOffsets | None = None) -> Iterator[None]:
    """Evaluation and aggregation always use every block."""
    set_block_adapters(blocks, torch.ones(len(blocks), dtype=torch.bool), base_offsets)
    try:
        yield
    finally:
        set_block_adapters(blocks, torch.ones(len(blocks), dtype=torch.bool), base_offsets)


class BlockDropper:
    """Draws and applies one block mask per optimizer step (or keeps all on for plain LoRA)."""

    def __init__(
        self,
        blocks: Sequence[Sequence[LoraLayer]],
        *,
        enabled: bool,
        p0: float,
        full_at: float,
        seed: int,
        base_offsets: BaseOffsets | None = None,
    ) -> None:
        self.blocks = blocks
        self.base_offsets = base_offsets
        self.enabled = enabled
        self.p0 = p0
        self.full_at = full_at
        self.generator = torch.Generator().manual_seed(seed)

    def step(self, progress: float) -> tuple[float, torch.Tensor]:
        """Draw and apply the mask for one step; returns (p, mask)."""
        num_blocks = len(self.blocks)
        if not self.enabled:
            mask = torch.ones(num_blocks, dtype=torch.bool)
            p = 1.0
        else:
            p = activation_probability(progress, self.p0, self.full_at)
            mask = sample_block_mask(num_blocks, p, self.generator)
        set_block_adapters(self.blocks, mask, self.base_offsets)
        return p, mask

    def step_all_active(self) -> None:
        """Switch every block back on (after training: evaluation uses all blocks)."""
        set_block_adapters(self.blocks, torch.ones(len(self.blocks), dtype=torch.bool), self.base_offsets)
