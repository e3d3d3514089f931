"""Layer pruning of adapters: remove the LoRA adapters of chosen transformer blocks.

CopRA's claim is that its adapters survive pruning: since every block was trained to be
useful in random coalitions of blocks, removing some blocks' adapters costs less than for
plain LoRA. A removed adapter contributes nothing (``B A = 0``): its factors are zeroed,
so the block computes its frozen base weights, exactly as a block CopRA dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from copra_core.adapters import LORA_A, LORA_B, AdapterState, lora_modules


def block_index(module: str, block_prefix: str) -> int | None:
    """Index of the transformer block holding ``module`` (None for modules outside the blocks).

    ``block_prefix`` is the blocks' ``nn.ModuleList`` path (``copra_core.lora.find_block_list``),
    e.g. ``base_model.model.bert.encoder.layer``.
    """
    if not module.startswith(block_prefix + "."):
        return None
    return int(module[len(block_prefix) + 1 :].split(".", 1)[0])


def every_other_block(num_blocks: int) -> set[int]:
    """Blocks 1, 3, 5, ...: the 'every other block removed' pattern (block 0 keeps its adapter)."""
    return set(range(1, num_blocks, 2))


def last_half(num_blocks: int) -> set[int]:
    """The last ``num_blocks // 2`` blocks."""
    return set(range(num_blocks - num_blocks // 2, num_blocks))


def pruned_state(state: Mapping[str, torch.Tensor], remove: Iterable[int], block_prefix: str) -> AdapterState:
    """A copy of ``state`` with the LoRA factors of the blocks in ``remove`` set to zero.

    Fully trained modules (the head) and LoRA outside the blocks are kept.
    """
    remove = set(remove)
    out = {key: value.clone() for key, value in state.items()}
    found = set()
    for module in lora_modules(state):
        index = block_index(module, block_prefix)
        if index in remove:
            out[module + LORA_A].zero_()
            out[module + LORA_B].zero_()
            found.add(index)
    missing = sorted(remove - found)
    if missing:
        raise ValueError(f"pruning: no LoRA modules in blocks {missing} under '{block_prefix}'")
    return out
