"""LoRA-GA initialisation: invariance, first-step alignment, PEFT's variant, export, bad input.

Every check runs on the real 2-block all-MiniLM-L6-v2 with dropout switched off (the
checks compare gradients of separate passes, which dropout would make differ).
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from peft import LoraConfig, LoraGAConfig, PeftModel, get_peft_model, preprocess_loraga
from torch import nn

from copra_core.adapters import LORA_A, LORA_B, export_adapter, get_adapter_state, lora_modules, set_adapter_state
from copra_core.base_offset import INIT_SUFFIX
from copra_core.config import ConfigError
from copra_core.copra import set_block_adapters
from copra_core.init import initialiser
from copra_core.init.gradients import estimate_weight_gradients
from copra_core.init.lora_ga import init_offsets, lora_ga_factors, lora_ga_state
from copra_core.learner import MODEL_KEYS, ModelBundle
from server.initialisation import initial_adapter
from tests.helpers import tiny_config

RANK = 4


@pytest.fixture(scope="module")
def ga_bundle():
    """Own model (its base weights get offset), rank 4 on query/value, dropout off."""
    bundle = ModelBundle(tiny_config(**{"lora.r": RANK, "lora.alpha": 8.0}))
    for module in bundle.model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return bundle


@pytest.fixture(scope="module")
def batches(ga_bundle):
    task = ga_bundle.task
    examples = task.calibration_examples(48)
    return [task.collate(examples[i : i + 16]) for i in range(0, 48, 16)]


@pytest.fixture(scope="module")
def gradients(ga_bundle, batches):
    set_adapter_state(ga_bundle.model, ga_bundle.initial_state())
    ga_bundle.base_offsets.apply(ga_bundle.model, {})
    grads, count = estimate_weight_gradients(ga_bundle.model, ga_bundle.task, batches, torch.device("cpu"))
    assert count == len(batches)
    return grads


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _install(bundle: ModelBundle, state: dict, offsets: dict) -> None:
    set_adapter_state(bundle.model, state)
    bundle.base_offsets.apply(bundle.model, offsets)


def test_gradient_estimate_matches_autograd_and_peft(ga_bundle, batches, gradients):
    # Independent computation 1: plain autograd, every base weight's .grad kept, averaged by hand.
    model = ga_bundle.model
    layers = {name: module.get_base_layer() for name, module in model.named_modules() if hasattr(module, "lora_A")}
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.weight.requires_grad_(True)
        layer.weight.grad = None
    for batch in batches:
        ga_bundle.task.batch_stats(model, batch)[0].backward()
    reference = {name: layer.weight.grad / len(batches) for name, layer in layers.items()}
    for p, flag in saved.items():
        p.requires_grad_(flag)
        p.grad = None
    assert set(gradients) == set(reference) == set(lora_modules(ga_bundle.initial_state()))
    for name in reference:
        torch.testing.assert_close(gradients[name], reference[name], rtol=1e-4, atol=1e-7)
        assert reference[name].norm() > 0

    # Independent computation 2: PEFT's own estimator (preprocess_loraga) on a fresh base model.
    base, _ = ga_bundle.task.load_model()
    for module in base.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = LoraConfig(r=RANK, lora_alpha=8, target_modules=["query", "value"], init_lora_weights="lora_ga")
    config.lora_ga_config = LoraGAConfig()

    def train_step() -> None:
        for batch in batches:
            ga_bundle.task.batch_stats(base, batch)[0].backward()

    head = {
        k: v.clone()
        for k, v in ga_bundle.model.base_model.model.classifier.modules_to_save.default.state_dict().items()
    }
    base.classifier.load_state_dict(head)  # the same (seeded) head as our model
    pooler = ga_bundle.model.base_model.model.bert.pooler.modules_to_save.default.state_dict()
    base.bert.pooler.load_state_dict(pooler)
    preprocess_loraga(base, config, train_step)
    for name, grad in gradients.items():
        peft_grad = base.get_submodule(name.removeprefix("base_model.model."))._peft_loraga_grad
        torch.testing.assert_close(grad, peft_grad, rtol=1e-4, atol=1e-7)


def test_initial_model_is_unchanged(ga_bundle, batches, gradients):
    default = ga_bundle.initial_state()
    _install(ga_bundle, default, {})
    before = _logits(ga_bundle.model, batches[0])
    state = lora_ga_state(default, gradients)
    offsets = init_offsets(state)
    assert all(key.endswith(INIT_SUFFIX) for key in offsets)
    # The factors are not zero: the invariance comes from the offset base.
    assert min(float(state[m + LORA_B].norm()) for m in lora_modules(state)) > 0.1
    _install(ga_bundle, state, offsets)
    after = _logits(ga_bundle.model, batches[0])
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4)
    _install(ga_bundle, state, {})  # without the offset the model does change
    assert (_logits(ga_bundle.model, batches[0]) - before).abs().max() > 1e-3
    _install(ga_bundle, default, {})


def _cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    # By hand: torch's cosine_similarity clamps the norms' product at 1e-8, and these
    # gradients are tiny (a step's norm is ~1e-9).
    x, y = x.double().flatten(), y.double().flatten()
    return float(x @ y / (x.norm() * y.norm()))


def _first_step_update(bundle: ModelBundle, state: dict, offsets: dict, batch: dict, lr: float) -> dict:
    """``s * (B1 A1 - B0 A0)`` per module after one SGD step on the LoRA factors."""
    _install(bundle, state, offsets)
    model = bundle.model
    model.zero_grad(set_to_none=True)
    bundle.task.batch_stats(model, batch)[0].backward()
    updates = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "lora_A"):
                continue
            a, b = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
            grad_a, grad_b = (
                module.lora_A["default"].weight.grad.double(),
                module.lora_B["default"].weight.grad.double(),
            )
            # B1 A1 - B0 A0 expanded (subtracting the products in fp32 would cancel the step away).
            delta = -lr * (grad_b @ a + b @ grad_a) + lr**2 * (grad_b @ grad_a)
            updates[name] = module.scaling["default"] * delta
    model.zero_grad(set_to_none=True)
    return updates


def test_first_step_aligns_with_the_full_gradient_better_than_default(ga_bundle, batches):
    batch = batches[0]
    default = ga_bundle.initial_state()
    # The full fine-tuning gradient on this batch; LoRA-GA built from it.
    _install(ga_bundle, default, {})
    full, _ = estimate_weight_gradients(ga_bundle.model, ga_bundle.task, [batch], torch.device("cpu"))
    ga_state = lora_ga_state(default, full)
    ga_step = _first_step_update(ga_bundle, ga_state, init_offsets(ga_state), batch, lr=1e-5)
    default_step = _first_step_update(ga_bundle, default, {}, batch, lr=1e-5)
    ga_cos, default_cos = [], []
    for name, g in full.items():
        # The best rank-2r approximation of the full step -G (Eckart-Young, exact SVD).
        u, s, vh = torch.linalg.svd(-g.double())
        best = u[:, : 2 * RANK] @ torch.diag(s[: 2 * RANK]) @ vh[: 2 * RANK]
        ga_cos.append(_cosine(ga_step[name], best))
        default_cos.append(_cosine(default_step[name], best))
    _install(ga_bundle, default, {})
    # To first order LoRA-GA's step is zeta^2 * s * lr * (-G_2r): cosine 1. PEFT's default
    # init (B = 0) moves only B, along G A0^T A0: a random projection of the gradient.
    assert min(ga_cos) > 0.99, ga_cos
    assert max(default_cos) < 0.5, default_cos


def test_same_subspaces_as_peft_lora_ga_on_the_same_gradient(ga_bundle, gradients):
    base, _ = ga_bundle.task.load_model()
    for name, grad in gradients.items():
        base.get_submodule(name.removeprefix("base_model.model."))._peft_loraga_grad = grad.clone()
    config = LoraConfig(r=RANK, lora_alpha=8, target_modules=["query", "value"], init_lora_weights="lora_ga")
    config.lora_ga_config = LoraGAConfig(direction="ArB2r", scale="stable", stable_gamma=16)
    torch.manual_seed(0)  # PEFT's randomised SVD
    peft_model = get_peft_model(copy.deepcopy(base), config)
    peft_state = get_adapter_state(peft_model)
    ours = lora_ga_state(ga_bundle.initial_state(), gradients, gamma=16.0, svd="exact")
    for module in lora_modules(ours):
        for suffix, rows in ((LORA_A, True), (LORA_B, False)):
            mine, theirs = ours[module + suffix], peft_state[module + suffix]
            q1 = torch.linalg.qr(mine.T if rows else mine).Q
            q2 = torch.linalg.qr(theirs.T if rows else theirs).Q
            cosines = torch.linalg.svdvals(q1.T @ q2)  # cosines of the principal angles
            assert float(cosines.min()) > 0.99, (module, suffix, cosines)
        # The documented difference: PEFT scales B by S[r:2r]; A is the same up to ours' zeta.
        zeta = ours[module + LORA_B].shape[0] ** 0.25 / 4.0
        a_ours = ours[module + LORA_A] / zeta
        assert torch.allclose(a_ours.abs(), peft_state[module + LORA_A].abs(), atol=5e-3)


def test_exported_adapter_reproduces_the_offset_model_on_the_original_base(ga_bundle, batches, gradients, tmp_path):
    ga_state = lora_ga_state(ga_bundle.initial_state(), gradients)
    offsets = init_offsets(ga_state)
    # A "trained" adapter: the initial factors moved in every direction.
    generator = torch.Generator().manual_seed(0)
    trained = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in ga_state.items()}
    _install(ga_bundle, trained, offsets)
    expected = _logits(ga_bundle.model, batches[1])
    export_adapter(ga_bundle.model, trained, tmp_path / "adapter", initial=ga_state)
    _install(ga_bundle, ga_bundle.initial_state(), {})

    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 2 * RANK and saved["lora_alpha"] == 16
    base, _ = ga_bundle.task.load_model()  # the ORIGINAL base weights
    for module in base.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(_logits(loaded, batches[1]), expected, rtol=0, atol=1e-4)
    assert not list(tmp_path.glob(".adapter*")), "temporary export folders left behind"


def test_copra_drops_the_init_offset_with_the_adapter(ga_bundle, gradients):
    ga_state = lora_ga_state(ga_bundle.initial_state(), gradients)
    offsets = init_offsets(ga_state)
    _install(ga_bundle, ga_state, offsets)
    blocks = ga_bundle.blocks
    layer = blocks[0][0]
    offset_weight = layer.get_base_layer().weight.detach().clone()
    checksum = ga_bundle.base_offsets.checksum(ga_bundle.model)
    base, _ = ga_bundle.task.load_model()  # independent copy of the pre-trained weights
    names = {id(m): n for n, m in ga_bundle.model.named_modules()}

    def pretrained(lora_layer: nn.Module) -> torch.Tensor:
        return base.get_submodule(names[id(lora_layer)].removeprefix("base_model.model.")).weight

    set_block_adapters(blocks, torch.tensor([False, True]), ga_bundle.base_offsets)
    # A dropped block is the pre-trained block (adapter and LoRA-GA's offset both off) ...
    for dropped in blocks[0]:
        assert dropped.disable_adapters
        assert torch.equal(dropped.get_base_layer().weight, pretrained(dropped))
    # ... while an active block keeps its offset base.
    for active in blocks[1]:
        assert not torch.equal(active.get_base_layer().weight, pretrained(active))
    set_block_adapters(blocks, torch.tensor([True, True]), ga_bundle.base_offsets)
    assert torch.equal(layer.get_base_layer().weight, offset_weight)  # bit-identical when back on
    assert ga_bundle.base_offsets.checksum(ga_bundle.model) == checksum
    _install(ga_bundle, ga_bundle.initial_state(), {})


def test_rslora_scaling_is_used_for_the_offset_and_the_export(tmp_path):
    bundle = ModelBundle(tiny_config(**{"lora.r": 2, "lora.alpha": 4.0, "lora.use-rslora": True}))
    layer = bundle.blocks[0][0]
    assert layer.scaling["default"] == pytest.approx(4.0 / 2**0.5)
    generator = torch.Generator().manual_seed(1)
    grads = {
        m: torch.randn(bundle.initial_state()[m + LORA_B].shape[0], 384, generator=generator)
        for m in lora_modules(bundle.initial_state())
    }
    state = lora_ga_state(bundle.initial_state(), grads)
    examples = bundle.task.calibration_examples(8)
    batch = bundle.task.collate(examples)
    bundle.model.eval()
    _install(bundle, bundle.initial_state(), {})
    before = _logits(bundle.model, batch)
    _install(bundle, state, init_offsets(state))
    torch.testing.assert_close(_logits(bundle.model, batch), before, rtol=0, atol=1e-4)
    trained = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
    _install(bundle, trained, init_offsets(state))
    expected = _logits(bundle.model, batch)
    export_adapter(bundle.model, trained, tmp_path / "adapter", initial=state)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["use_rslora"] and saved["r"] == 4
    assert saved["lora_alpha"] / 4**0.5 == pytest.approx(layer.scaling["default"])
    base, _ = bundle.task.load_model()
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(_logits(loaded, batch), expected, rtol=0, atol=1e-4)


def test_bad_input_is_a_clear_error(ga_bundle, gradients):
    config = tiny_config(**{"init.method": "lora_ga", "init.calibration-batches": 0})
    with pytest.raises(ConfigError, match=r"init\.calibration-batches"):
        config.validate()
    with pytest.raises(ConfigError, match=r"init\.method.*known"):
        initialiser("lora-ga")
    with pytest.raises(ConfigError, match=r"lora\.r.*2 \* r <= min"):
        lora_ga_factors(torch.randn(6, 5), rank=3)
    too_wide = {"m.lora_A.weight": torch.zeros(5, 6), "m.lora_B.weight": torch.zeros(6, 5)}
    with pytest.raises(ConfigError, match=r"lora\.r.*'m' \(6 x 6\)"):
        initialiser("lora_ga").check(too_wide)  # before any gradient is estimated
    initialiser("default").check(too_wide)
    with pytest.raises(ValueError, match="no calibration batches"):
        estimate_weight_gradients(ga_bundle.model, ga_bundle.task, [], torch.device("cpu"))
    with pytest.raises(ValueError, match="not finite"):
        lora_ga_factors(torch.full((8, 8), float("nan")), rank=2)
    with pytest.raises(KeyError, match="no gradient estimate"):
        lora_ga_state(ga_bundle.initial_state(), dict(list(gradients.items())[:1]))


def test_server_source_initialisation_keeps_the_model_and_reports_its_cost(ga_bundle, batches):
    config = tiny_config(**{"lora.r": RANK, "lora.alpha": 8.0, "init.method": "lora_ga", "init.calibration-batches": 2})
    assert config.fingerprint(MODEL_KEYS) == ga_bundle.config.fingerprint(MODEL_KEYS)
    default = ga_bundle.initial_state()
    _install(ga_bundle, default, {})
    before = _logits(ga_bundle.model, batches[2])
    state, offsets, metrics = initial_adapter(None, config, ga_bundle, default)  # the server needs no grid
    # (calibration_gradients checks it ran init.calibration-batches = 2 batches, not the bundle's 8)
    assert set(offsets) == {m + INIT_SUFFIX for m in lora_modules(state)}
    assert metrics["init/clients"] == 0 and metrics["init/time_s"] > 0
    _install(ga_bundle, state, offsets)
    torch.testing.assert_close(_logits(ga_bundle.model, batches[2]), before, rtol=0, atol=1e-4)
    _install(ga_bundle, default, {})


@pytest.mark.e2e
def test_federated_lora_ga_from_clients_gives_every_client_the_same_base(tmp_path):
    """Through Flower: round-0 gradient exchange, CopRA on, checksums, export on the original base."""
    from tests.helpers import exported_accuracy, run_tagged

    out = tmp_path / "run"
    args = ["simulate", "--quick", "--rounds", "2", "--init", "lora_ga", "--set", "init.source=clients"]
    # What is checked holds after any number of steps: 10 short steps per round instead of --quick's 100.
    small = {"train.local-steps": 10, "data.eval-size": 64, "diagnostics.sample-size": 32}
    args += [x for key, value in small.items() for x in ("--set", f"{key}={value}")]
    proc = run_tagged([sys.executable, "-m", "simulations.cli", *args, "--out", str(out), "--no-display"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((out / "config.json").read_text())
    assert config["copra.enabled"] and config["init.method"] == "lora_ga"  # flat keys
    assert rows[0]["init/clients"] == 2
    server_crc = rows[0]["init/base_crc32"]
    assert server_crc != 0
    for row in rows[1:]:
        # Every client's offset base is bit-identical to the server's (CRC32 of the weights).
        assert row["clients/distinct_bases"] == 1
        assert row["clients/base_crc32"] == [server_crc] and row["server/base_crc32"] == server_crc
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 2 * config["lora.r"]
    assert not (out / "base_offset.safetensors").exists()  # folded into the adapter instead
    # Loaded with PEFT on the ORIGINAL base, the adapter gives the run's final accuracy.
    assert exported_accuracy(out) == pytest.approx(rows[-1]["global/accuracy"], abs=1e-9)


def test_server_rejects_clients_whose_base_differs_from_its_own():
    from types import SimpleNamespace

    from server.offsets import check_client_bases

    def reply(node: int, crc: int) -> SimpleNamespace:
        return SimpleNamespace(
            metadata=SimpleNamespace(src_node_id=node),
            content=SimpleNamespace(metric_records={"metrics": {"base-crc32": crc}}),
        )

    metrics = check_client_bases([reply(1, 7), reply(2, 7)], lambda: 7)
    assert metrics == {"clients/distinct_bases": 1, "clients/base_crc32": [7], "server/base_crc32": 7}
    without_server = check_client_bases([reply(1, 7), reply(2, 7)], None)
    assert without_server == {"clients/distinct_bases": 1, "clients/base_crc32": [7]}
    with pytest.raises(RuntimeError, match="differ from the server's"):
        check_client_bases([reply(1, 8), reply(2, 8)], lambda: 7)
    with pytest.raises(RuntimeError, match="different base weights"):
        check_client_bases([reply(1, 7), reply(2, 8)], lambda: 7)
