"""Layer pruning of adapters against an independent computation."""

from __future__ import annotations

import pytest
import torch

from copra_core.adapters import LORA_A, LORA_B, lora_modules, set_adapter_state
from copra_core.copra import set_block_adapters
from copra_core.lora import find_block_list
from copra_core.pruning import block_index, every_other_block, last_half, pruned_state


def test_patterns():
    assert every_other_block(6) == {1, 3, 5}
    assert last_half(6) == {3, 4, 5}
    assert last_half(5) == {3, 4}


def test_pruned_adapter_equals_the_blocks_switched_off(bundle):
    """Zeroing a block's factors gives the same logits as disabling that block's adapters."""
    prefix, _ = find_block_list(bundle.model)
    generator = torch.Generator().manual_seed(0)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in bundle.initial_state().items()}
    examples = bundle.task.server_examples(16)
    batch = {k: v for k, v in bundle.task.collate(examples).items() if k != "labels"}
    was_training = bundle.model.training
    bundle.model.eval()
    with torch.no_grad():
        set_adapter_state(bundle.model, state)
        set_block_adapters(bundle.blocks, torch.tensor([True, False]))
        expected = bundle.model(**batch).logits
        set_block_adapters(bundle.blocks, torch.tensor([True, True]))
        full = bundle.model(**batch).logits
        pruned = pruned_state(state, {1}, prefix)
        set_adapter_state(bundle.model, pruned)
        got = bundle.model(**batch).logits
    set_adapter_state(bundle.model, bundle.initial_state())
    bundle.model.train(was_training)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (full - expected).abs().max() > 1e-3  # block 1's adapter mattered
    # Only block 1's factors changed; the head and block 0 are untouched.
    for key, value in pruned.items():
        module = key.removesuffix(LORA_A).removesuffix(LORA_B)
        if module in lora_modules(state) and block_index(module, prefix) == 1:
            assert not value.any()
        else:
            assert torch.equal(value, state[key])


def test_unknown_block_is_an_error(bundle):
    prefix, _ = find_block_list(bundle.model)
    with pytest.raises(ValueError, match=r"no LoRA modules in blocks \[7\]"):
        pruned_state(bundle.initial_state(), {7}, prefix)
