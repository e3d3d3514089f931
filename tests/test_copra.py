import math

import pytest
import torch

from copra_core.adapters import get_adapter_state, set_adapter_state
from copra_core.copra import (
    BlockDropper,
    activation_probability,
    global_progress,
    sample_block_mask,
    set_block_adapters,
)
from copra_core.training import RoundSchedule, train_local


@pytest.mark.parametrize(
    ("progress", "p0", "expected"),
    [(0.0, 0.0, 0.0), (0.375, 0.0, 0.5), (0.75, 0.0, 1.0), (1.0, 0.0, 1.0), (0.0, 0.1, 0.1), (0.375, 0.1, 0.55)],
)
def test_schedule_values(progress, p0, expected):
    assert activation_probability(progress, p0, 0.75) == pytest.approx(expected)


def test_progress_is_global_not_per_round():
    # Round 3 of 4 with 10 local steps starts at 20/40, not at 0.
    assert global_progress(3, 0, 4, 10) == pytest.approx(0.5)
    assert global_progress(1, 0, 4, 10) == 0.0
    assert global_progress(4, 9, 4, 10) == pytest.approx(39 / 40)
    schedule = RoundSchedule(server_round=2, num_rounds=2, local_steps=5)
    assert schedule.progress(0) == pytest.approx(0.5)


def test_mask_statistics_match_bernoulli():
    generator = torch.Generator().manual_seed(123)
    draws = torch.stack([sample_block_mask(6, 0.4, generator) for _ in range(4000)]).float()
    # P(active) = p + P(all off) * 1/6 because one block is switched back on.
    expected = 0.4 + (0.6**6) / 6
    se = math.sqrt(expected * (1 - expected) / 4000)
    assert abs(draws.mean(0) - expected).max() < 4 * se
    assert (draws.sum(1) >= 1).all()


def test_at_least_one_block_and_uniform_choice():
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_block_mask(4, 0.0, generator) for _ in range(2000)]).float()
    assert (draws.sum(1) == 1).all()
    assert abs(draws.mean(0) - 0.25).max() < 0.05


def test_mask_shared_within_block(bundle):
    dropper = BlockDropper(bundle.blocks, enabled=True, p0=0.3, full_at=0.75, seed=1)
    for _ in range(20):
        _, mask = dropper.step(0.1)
        for layers, active in zip(bundle.blocks, mask.tolist(), strict=True):
            assert layers, "every block carries LoRA layers"
            assert {layer.disable_adapters for layer in layers} == {not active}
    dropper.step_all_active()
    assert not any(layer.disable_adapters for layers in bundle.blocks for layer in layers)


def _batch(bundle):
    examples = bundle.task.server_examples(8)
    return next(bundle.task.eval_batches(examples, 8))


def test_dropped_block_contributes_no_lora_delta(bundle):
    """Logits with block 0 dropped == logits with block 0's LoRA B zeroed (independent path)."""
    model = bundle.model
    model.eval()
    batch = {k: v for k, v in _batch(bundle).items() if k != "labels"}
    state = get_adapter_state(model)
    generator = torch.Generator().manual_seed(0)
    # Non-zero B everywhere, and a head with unit-scale weights so logit differences are visible.
    trained = {
        k: (v if "lora_A" in k else torch.randn(v.shape, generator=generator) * (0.2 if "lora_B" in k else 1.0))
        for k, v in state.items()
    }
    set_adapter_state(model, trained)
    with torch.no_grad():
        all_on = model(**batch).logits
        set_block_adapters(bundle.blocks, torch.tensor([False, True]))
        dropped = model(**batch).logits
        set_block_adapters(bundle.blocks, torch.tensor([True, True]))
        zeroed = {k: (torch.zeros_like(v) if "layer.0." in k and "lora_B" in k else v) for k, v in trained.items()}
        set_adapter_state(model, zeroed)
        reference = model(**batch).logits
    set_adapter_state(model, state)
    assert torch.allclose(dropped, reference, atol=1e-5)
    assert (all_on - reference).abs().max() > 1e-2


def test_dropped_block_factors_are_not_updated(bundle):
    """A block that is never active in a round keeps its LoRA factors bit for bit."""
    model = bundle.model
    before = get_adapter_state(model)

    class OnlyBlockOne(BlockDropper):
        def step(self, progress):
            set_block_adapters(self.blocks, torch.tensor([False, True]))
            return 0.5, torch.tensor([False, True])

    _train_three_steps(bundle, OnlyBlockOne(bundle.blocks, enabled=True, p0=0.1, full_at=0.75, seed=0))
    after = get_adapter_state(model)
    set_adapter_state(model, before)
    for key in before:
        if "lora_" in key:
            same = torch.equal(before[key], after[key])
            assert same == ("layer.0." in key), key


def test_freeze_a_trains_b_only_and_restores_requires_grad(bundle):
    """FFA-LoRA's local side: every A bit for bit unchanged, B moved, A trainable again after."""
    model = bundle.model
    before = get_adapter_state(model)
    dropper = BlockDropper(bundle.blocks, enabled=False, p0=1.0, full_at=0.75, seed=0)
    _train_three_steps(bundle, dropper, weight_decay=0.1, freeze_a=True)
    after = get_adapter_state(model)
    set_adapter_state(model, before)
    lora_a = [k for k in before if k.endswith("lora_A.weight")]
    lora_b = [k for k in before if k.endswith("lora_B.weight")]
    assert lora_a and all(torch.equal(before[k], after[k]) for k in lora_a)
    assert all(not torch.equal(before[k], after[k]) for k in lora_b)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)


def _train_three_steps(bundle, dropper, weight_decay=0.0, freeze_a=False):
    """Three local steps on 32 dev sentences (batch 8) with the given block dropper."""
    batches = bundle.task.train_batches(bundle.task.server_examples(32), 8, 3, seed=0, offset=0)
    train_local(
        bundle.model,
        bundle.task,
        batches,
        schedule=RoundSchedule(1, 1, 3),
        dropper=dropper,
        lr=1e-2,
        weight_decay=weight_decay,
        freeze_a=freeze_a,
        device=bundle.device,
    )
