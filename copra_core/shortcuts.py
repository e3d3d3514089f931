"""LoRA-adapted shortcut connections around transformer blocks (HeteroLoRA's extended candidates).

HeteroLoRA (arXiv 2406.14956) widens the search space with a low-rank map from a block's
input straight to its output: ``h_out = block(h_in) + (alpha / r) * B A h_in``. Here the
shortcut is a plain ``nn.Linear(d, d)`` child of the block with a frozen zero weight,
added to the block's output by a forward hook, and PEFT puts LoRA on it like on any other
projection (target module name ``block_shortcut``; not ``lora_...``, a prefix PEFT
reserves for its own parameters). At B = 0 the model computes exactly what it computed
without shortcuts, and everything downstream (CopRA's block dropping, allocation, masked
averaging, barrier diagnostics, PEFT export) treats the shortcut as one more LoRA module
of its block: no special case anywhere else.

An exported adapter with shortcuts names ``block_shortcut`` modules the plain base model
does not have: call :func:`add_shortcuts` on the base before ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from copra_core.lora import find_block_list

#: Leaf name of the shortcut module inside each block (what lora.target-modules gets).
SHORTCUT = "block_shortcut"


def _add_shortcut_output(block: nn.Module, args: tuple, kwargs: Mapping[str, Any], output: Any) -> Any:
    """Forward hook: the block's output plus its shortcut applied to the block's input."""
    hidden_in = args[0] if args else kwargs["hidden_states"]
    extra = getattr(block, SHORTCUT)(hidden_in)  # PEFT's LoRA wrapper once the model is adapted
    if isinstance(output, tuple):
        return (output[0] + extra, *output[1:])
    return output + extra


def add_shortcuts(model: nn.Module) -> list[str]:
    """Give every transformer block of ``model`` a zero shortcut (idempotent); return their names.

    The shortcut maps the hidden size to itself (``model.config.hidden_size``); its weight
    is zero and frozen, so only a LoRA on it changes what the model computes.
    """
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise ValueError("Config key 'lora.shortcuts': the model's config has no integer hidden_size")
    prefix, blocks = find_block_list(model)
    weight = next(model.parameters())
    for block in blocks:
        if hasattr(block, SHORTCUT):
            continue
        shortcut = nn.Linear(hidden, hidden, bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            shortcut.weight.zero_()
        shortcut.weight.requires_grad_(False)
        block.add_module(SHORTCUT, shortcut)
        block.register_forward_hook(_add_shortcut_output, with_kwargs=True)
    return [f"{prefix}.{index}.{SHORTCUT}" for index in range(len(blocks))]
