"""The ServerRun's inputs stay the caller's, and the shared model has one reset point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from copra_core.adapters import get_adapter_state
from copra_core.base_offset import INIT_SUFFIX
from copra_core.learner import MODEL_KEYS
from tests.helpers import tiny_config


class _Stop(Exception):
    """Raised by the grid: the test ends the run at its first contact with the nodes."""


class _StoppingGrid:
    def get_node_ids(self):
        raise _Stop


def test_run_server_leaves_the_callers_config_unchanged(tmp_path):
    """A simulation runs the ServerApp in the caller's thread: a rule's client settings must not leak.

    ``ffa`` sets ``lora.freeze-a=true`` for its clients. It used to be written into the
    caller's config, so a benchmark's cache recorded ``freeze-a=true`` and the next
    invocation (``freeze-a=false``) refused its own cache.
    """
    from server.app import run_server

    config = tiny_config(**{"strategy.name": "ffa", "out-dir": str(tmp_path / "run")})
    before = config.to_flat()
    with pytest.raises(_Stop):
        run_server(_StoppingGrid(), config, observers=())  # stops at wait_for_nodes, after the set-up
    assert config.to_flat() == before
    assert config.lora.freeze_a is False
    # The run itself trains with A frozen: its recorded config says so.
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    freeze_a = written["lora.freeze-a"] if "lora.freeze-a" in written else written["lora"]["freeze_a"]
    assert freeze_a is True


def test_benchmark_cache_of_a_rule_with_client_overrides_is_accepted_again(tmp_path, monkeypatch):
    """benchmarks.common caches each run with its config; the next invocation must accept its own cache."""
    import benchmarks.common as common
    from server.app import run_server

    def simulate_many(configs, observers, after_run):  # the ServerApp's part of simulate_many, no nodes
        for config in configs:
            with pytest.raises(_Stop):
                run_server(_StoppingGrid(), config, observers=observers)
            (Path(config.out_dir) / "metrics.jsonl").write_text(json.dumps({"round": 0}) + "\n")
            after_run(config)

    monkeypatch.setattr(common, "simulate_many", simulate_many)
    cache = tmp_path / "ffa.json"
    first = common.cached_run(tiny_config(**{"strategy.name": "ffa"}), cache, keep=lambda key: True)
    assert first["config"]["lora.freeze-a"] is False
    again = common.cached_run(tiny_config(**{"strategy.name": "ffa"}), cache, keep=lambda key: True)
    assert again == first


def test_model_keys_are_the_fields_that_shape_the_model():
    """Derived from the config sections; the same keys the hand-kept list named (same cache keys)."""
    from copra_core.config import RunConfig

    handpicked = {
        "task",
        "seed",
        "device",
        "model.name",
        "model.num-hidden-layers",
        "model.max-length",
        *(f"lora.{k}" for k in ("r", "alpha", "dropout", "target-modules", "modules-to-save", "use-rslora")),
        "lora.shortcuts",
        *(k for k in RunConfig().to_flat() if k.startswith(("data.", "causal-lm."))),
    }
    assert set(MODEL_KEYS) == handpicked
    assert "lora.freeze-a" not in MODEL_KEYS and "train.lr" not in MODEL_KEYS


def test_session_sets_adapter_and_offsets_and_puts_trainability_back(bundle):
    """Whatever an earlier use left in the shared model, a session starts from what it is given."""
    seeded = bundle.initial_state()
    module = next(k.removesuffix(".lora_A.weight") for k in seeded if k.endswith(".lora_A.weight"))
    layer = bundle.model.get_submodule(module)
    original = layer.get_base_layer().weight.detach().clone()
    other = {k: v + 0.5 for k, v in seeded.items()}
    offset = {module + INIT_SUFFIX: torch.ones_like(original)}
    trainable = [p.requires_grad for p in bundle.model.parameters()]
    with bundle.session(other, offset) as model:
        assert model is bundle.model
        for key, value in get_adapter_state(model).items():
            assert torch.equal(value, other[key]), key
        scaling = layer.scaling["default"]
        torch.testing.assert_close(layer.get_base_layer().weight, original + scaling * offset[module + INIT_SUFFIX])
        for param in model.parameters():  # e.g. FFA-LoRA or an allocation freezing factors
            param.requires_grad_(False)
    assert [p.requires_grad for p in bundle.model.parameters()] == trainable
    with bundle.session(seeded):  # no offsets: the original base, bitwise
        assert torch.equal(layer.get_base_layer().weight, original)
        for key, value in get_adapter_state(bundle.model).items():
            assert torch.equal(value, seeded[key]), key
