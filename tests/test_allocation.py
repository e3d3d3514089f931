"""HeteroLoRA allocation: proxies against hand computation, budgets, masked averaging, export."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from copra_core.adapters import (
    LORA_A,
    LORA_B,
    array_record_nbytes,
    get_adapter_state,
    set_adapter_state,
    to_array_record,
)
from copra_core.allocation import (
    ClientPlan,
    allocate,
    check_partial,
    client_plan,
    effective_state,
    module_costs,
    pad_average,
    partial_state,
    product_average,
    restricted_training,
)
from copra_core.allocation.budget import weighted_scores
from copra_core.allocation.export import effective_ranks, export_allocated_adapter
from copra_core.allocation.proxies import PROXIES, build_proxy, lora_pairs, score_modules
from copra_core.config import ConfigError, RunConfig
from copra_core.diagnostics import aggregate_error
from strategies.base import ClientUpdate
from strategies.masked import MaskedAveraging

DIM, LENGTH, SCALE = 3, 4, 2.0  # LoRA alpha 4 / r 2


# ---------------------------------------------------------------------- a tiny model
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(DIM, DIM, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class TinyNet(nn.Module):
    """Two bias-free linear blocks on given embeddings: small enough to differentiate by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, DIM)
        self.layers = nn.ModuleList([Block() for _ in range(2)])

    def get_input_embeddings(self) -> nn.Embedding:
        return self.emb

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> SimpleNamespace:
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden)
        return SimpleNamespace(logits=hidden)


class SquaredErrorTask:
    """Loss 0.5 * ||f(x) - t||^2 summed over positions (only what the proxies call)."""

    def batch_stats(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        out = model(inputs_embeds=batch["x"]).logits
        return 0.5 * ((out - batch["t"]) ** 2).sum(), {}


def tiny_model(b_zero: bool = False) -> PeftModel:
    torch.manual_seed(0)
    base = TinyNet().double()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], lora_dropout=0.0))
    model.double()
    if not b_zero:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, b in lora_pairs(model).values():
                b.copy_(torch.randn(b.shape, generator=generator, dtype=torch.float64))
    return model


def tiny_batch(seed: int = 2) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.zeros(1, LENGTH, dtype=torch.long),
        "x": torch.randn(1, LENGTH, DIM, generator=generator, dtype=torch.float64),
        "t": torch.randn(1, LENGTH, DIM, generator=generator, dtype=torch.float64),
    }


def numpy_weights(model: PeftModel) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(W, A, B) per block as numpy arrays."""
    out = []
    for name, (a, b) in sorted(lora_pairs(model).items()):
        weight = model.get_submodule(name).get_base_layer().weight
        out.append((weight.detach().numpy().copy(), a.detach().numpy().copy(), b.detach().numpy().copy()))
    return out


def hand_gradients(params, x: np.ndarray, t: np.ndarray):
    """Gradients of 0.5||M2 M1 x - t||^2 w.r.t. each block's (A, B), M = W + s B A, by the chain rule."""
    (w1, a1, b1), (w2, a2, b2) = params
    m1, m2 = w1 + SCALE * b1 @ a1, w2 + SCALE * b2 @ a2
    h0 = x.T  # DIM x LENGTH, one column per position
    h1 = m1 @ h0
    h2 = m2 @ h1
    d2 = h2 - t.T  # dL/dh2
    d1 = m2.T @ d2
    grads = []
    for (_, a, b), h_in, delta in ((params[0], h0, d1), (params[1], h1, d2)):
        grads.append((SCALE * b.T @ delta @ h_in.T, SCALE * delta @ (a @ h_in).T))
    return grads


def names(model: PeftModel) -> list[str]:
    return sorted(lora_pairs(model))


def score(model: PeftModel, proxy: str, batches: list[dict]) -> tuple[dict, bool]:
    blocks = [[model.get_submodule(n)] for n in names(model)]
    return score_modules(
        model, blocks, SquaredErrorTask(), batches, torch.device("cpu"), proxy=proxy, probe_std=1e-3, seed=0
    )


# ---------------------------------------------------------------------- proxies
def test_grad_norm_and_snip_match_hand_gradients():
    model, batch = tiny_model(), tiny_batch()
    params = numpy_weights(model)
    grads = hand_gradients(params, batch["x"][0].numpy(), batch["t"][0].numpy())
    grad_norm, _ = score(model, "grad_norm", [batch])
    snip, _ = score(model, "snip", [batch])
    for name, (_, a, b), (ga, gb) in zip(names(model), params, grads, strict=True):
        assert grad_norm[name] == pytest.approx(np.linalg.norm(ga) + np.linalg.norm(gb), rel=1e-9)
        assert snip[name] == pytest.approx(np.abs(a * ga).sum() + np.abs(b * gb).sum(), rel=1e-9)


def test_scores_average_over_batches():
    model, batches = tiny_model(), [tiny_batch(2), tiny_batch(3)]
    params = numpy_weights(model)
    together, _ = score(model, "grad_norm", batches)
    for name, index in zip(names(model), range(2), strict=True):
        per_batch = []
        for batch in batches:
            ga, gb = hand_gradients(params, batch["x"][0].numpy(), batch["t"][0].numpy())[index]
            per_batch.append(np.linalg.norm(ga) + np.linalg.norm(gb))
        assert together[name] == pytest.approx(np.mean(per_batch), rel=1e-9)


def test_synflow_matches_hand_computation_and_restores_signs():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores, _ = score(model, "synflow", [tiny_batch()])
    # By hand: every weight |.|, input all ones, R = sum of outputs; dR/dh2 = 1.
    (w1, a1, b1), (w2, a2, b2) = [(np.abs(w), np.abs(a), np.abs(b)) for w, a, b in numpy_weights(model)]
    m1, m2 = w1 + SCALE * b1 @ a1, w2 + SCALE * b2 @ a2
    h0 = np.ones((DIM, LENGTH))
    h1 = m1 @ h0
    d2 = np.ones((DIM, LENGTH))
    d1 = m2.T @ d2
    expected = []
    for a, b, h_in, delta in ((a1, b1, h0, d1), (a2, b2, h1, d2)):
        ga, gb = SCALE * b.T @ delta @ h_in.T, SCALE * delta @ (a @ h_in).T
        expected.append(np.abs(a * ga).sum() + np.abs(b * gb).sum())
    assert [scores[n] for n in names(model)] == pytest.approx(expected, rel=1e-9)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # signs restored exactly


def test_alpha_test_is_the_gate_step():
    """One batch, SGD lr 1: |alpha - 1| = |dL/dalpha| = |<s B A h_in, dL/dh_out>|."""
    model, batch = tiny_model(), tiny_batch()
    params = numpy_weights(model)
    scores, _ = score(model, "alpha_test", [batch])
    (w1, a1, b1), (w2, a2, b2) = params
    m1, m2 = w1 + SCALE * b1 @ a1, w2 + SCALE * b2 @ a2
    h0 = batch["x"][0].numpy().T
    h1 = m1 @ h0
    d2 = m2 @ h1 - batch["t"][0].numpy().T
    d1 = m2.T @ d2
    expected = [abs(np.sum((SCALE * b1 @ a1 @ h0) * d1)), abs(np.sum((SCALE * b2 @ a2 @ h1) * d2))]
    assert [scores[n] for n in names(model)] == pytest.approx(expected, rel=1e-9)


def test_constant_scores_every_module_alike():
    model = tiny_model()
    scores, probed = score(model, "constant", [tiny_batch()])
    assert scores == dict.fromkeys(names(model), 1.0) and not probed


@pytest.mark.parametrize("proxy", ["snip", "synflow", "alpha_test"])
def test_b_zero_is_probed_with_a_tiny_random_b_and_restored(proxy):
    model = tiny_model(b_zero=True)
    scores, probed = score(model, proxy, [tiny_batch()])
    assert probed
    assert all(s > 0 for s in scores.values()), scores  # not identically zero
    assert all(not b.any() for _, b in lora_pairs(model).values())  # B is zero again


def test_grad_norm_needs_no_probe_at_b_zero():
    model = tiny_model(b_zero=True)
    params = numpy_weights(model)
    batch = tiny_batch()
    scores, probed = score(model, "grad_norm", [batch])
    assert not probed
    grads = hand_gradients(params, batch["x"][0].numpy(), batch["t"][0].numpy())
    for name, (ga, gb) in zip(names(model), grads, strict=True):
        assert np.abs(ga).max() == 0  # dL/dA = s B^T ... = 0 at B = 0
        assert scores[name] == pytest.approx(np.linalg.norm(gb), rel=1e-9) and scores[name] > 0


def test_unknown_proxy_is_a_config_error():
    with pytest.raises(ConfigError, match=r"allocation\.proxy.*'fisher'"):
        build_proxy("fisher")
    assert set(PROXIES) == {"grad_norm", "snip", "synflow", "constant", "alpha_test"}


# ---------------------------------------------------------------------- budgets
COSTS = {f"m{i}": 8 * (16 + 16 * (1 + i % 3)) for i in range(10)}


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 0.99, 1.0])
def test_fraction_budget_enables_floor_of_the_candidates(budget):
    scores = {m: float(i) for i, m in enumerate(COSTS)}
    allocation = allocate(scores, COSTS, budget=budget)
    assert len(allocation.modules) == max(1, math.floor(budget * len(COSTS)))
    best = sorted(COSTS, key=lambda m: -scores[m])[: len(allocation.modules)]
    assert set(allocation.modules) == set(best)
    assert allocation.params == sum(COSTS[m] for m in allocation.modules)


@pytest.mark.parametrize("budget_params", [256, 700, 1500, 10_000])
def test_parameter_budget_is_never_exceeded_and_filled_greedily(budget_params):
    scores = {m: float((7 * i) % 10) for i, m in enumerate(COSTS)}
    allocation = allocate(scores, COSTS, budget=1.0, budget_params=budget_params)
    assert allocation.params <= budget_params
    left = budget_params - allocation.params
    # Greedy in ranking order: every module left out is one that no longer fitted when reached.
    used = 0
    for module in allocation.ranking:
        fits = used + COSTS[module] <= budget_params
        assert (module in allocation.modules) == fits
        used += COSTS[module] if fits else 0
    assert left >= 0


def test_constant_scores_give_a_seeded_random_allocation():
    scores = dict.fromkeys(COSTS, 1.0)
    first = allocate(scores, COSTS, budget=0.3, seed=1)
    assert first == allocate(scores, COSTS, budget=0.3, seed=1)
    picks = {allocate(scores, COSTS, budget=0.3, seed=s).modules for s in range(20)}
    assert len(picks) > 10  # not always the same modules


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("allocation.budget", 0.0, "allocation.budget"),
        ("allocation.budget", 1.5, "allocation.budget"),
        ("allocation.budget", -0.1, "allocation.budget"),
        ("allocation.budget-params", -5, "allocation.budget-params"),
        ("allocation.scoring-batches", 0, "allocation.scoring-batches"),
        ("allocation.client-ranks", "2,8,8", "allocation.client-ranks"),
    ],
)
def test_bad_allocation_config_names_the_key(key, value, match):
    config = RunConfig.from_flat({"federation.clients": 2, key: value})
    with pytest.raises(ConfigError, match=match):
        config.validate()


def test_bad_budget_to_allocate_and_node_config_are_errors():
    with pytest.raises(ConfigError, match=r"allocation\.budget"):
        allocate({"m": 1.0}, {"m": 10}, budget=0)
    with pytest.raises(ConfigError, match="budget-params"):
        allocate({"m": 1.0}, {"m": 10}, budget=1, budget_params=5)
    with pytest.raises(ConfigError, match="lora-rank"):
        client_plan(["m"], ["m"], {"lora-rank": 16}, full_rank=8)
    with pytest.raises(ConfigError, match="allocation-budget"):
        client_plan(["m"], ["m"], {"allocation-budget": 0}, full_rank=8)


def test_client_plan_takes_a_prefix_of_the_ranking_for_its_own_budget():
    ranking = [f"m{i}" for i in range(8)]
    assert client_plan(["m0", "m3"], ranking, {}, 8) == ClientPlan(("m0", "m3"), 8)
    assert client_plan(["m0"], ranking, {"allocation-budget": 0.5, "lora-rank": "2"}, 8) == ClientPlan(
        tuple(ranking[:4]), 2
    )


def test_scores_are_averaged_by_examples():
    mean = weighted_scores([({"a": 1.0, "b": 0.0}, 30), ({"a": 0.0, "b": 2.0}, 10)])
    assert mean == pytest.approx({"a": 0.75, "b": 0.5})
    with pytest.raises(ValueError, match="different modules"):
        weighted_scores([({"a": 1.0}, 1), ({"b": 1.0}, 1)])


# ---------------------------------------------------------------------- masked averaging
RANK = 4
SHAPES = {"mod0": (6, 5), "mod1": (7, 5), "mod2": (6, 6)}  # (d_out, d_in)


def global_state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {"head.weight": torch.randn(2, 5, generator=generator)}
    for module, (d_out, d_in) in SHAPES.items():
        state[module + LORA_A] = torch.randn(RANK, d_in, generator=generator)
        state[module + LORA_B] = torch.randn(d_out, RANK, generator=generator)
    return state


def client_reply(current, modules, rank, seed):
    """A partial reply: the given modules at ``rank``, moved by a seeded random step; the head."""
    generator = torch.Generator().manual_seed(seed)
    moved = {k: v + torch.randn(v.shape, generator=generator) for k, v in current.items()}
    return partial_state(moved, ClientPlan(tuple(modules), rank))


def expected_padding(current, replies):
    """Loop by loop: component j of a module = example-weighted mean over the replies that hold it."""
    out = {k: v.clone() for k, v in current.items()}
    total = sum(n for _, n in replies)
    out["head.weight"] = sum(s["head.weight"] * n for s, n in replies) / total
    for module in SHAPES:
        for j in range(RANK):
            holders = [(s, n) for s, n in replies if module + LORA_A in s and s[module + LORA_A].shape[0] > j]
            if not holders:
                continue
            weight = sum(n for _, n in holders)
            out[module + LORA_A][j] = sum(s[module + LORA_A][j] * n for s, n in holders) / weight
            out[module + LORA_B][:, j] = sum(s[module + LORA_B][:, j] * n for s, n in holders) / weight
    return out


@pytest.fixture
def mixed_round():
    current = global_state()
    replies = [
        (client_reply(current, ["mod0", "mod1"], 4, 1), 30.0),
        (client_reply(current, ["mod0"], 2, 2), 10.0),
        (client_reply(current, ["mod1"], 1, 3), 20.0),
    ]
    return current, replies


def test_padding_average_matches_an_independent_loop(mixed_round):
    current, replies = mixed_round
    out = pad_average(replies, current)
    expected = expected_padding(current, replies)
    for key in current:
        torch.testing.assert_close(out[key], expected[key], rtol=1e-6, atol=1e-6)
    # mod2: nobody trained it -> its previous value, bit for bit.
    assert torch.equal(out["mod2" + LORA_A], current["mod2" + LORA_A])
    assert torch.equal(out["mod2" + LORA_B], current["mod2" + LORA_B])
    # mod1 component 3 only client 0 holds: exactly its value, not diluted by the others' absence.
    torch.testing.assert_close(out["mod1" + LORA_A][3], replies[0][0]["mod1" + LORA_A][3])


def test_masked_rule_product_mode_is_the_exact_average_over_trainers(mixed_round):
    current, replies = mixed_round
    rule = MaskedAveraging(rank_merge="product")
    updates = [ClientUpdate(i, s, int(n)) for i, (s, n) in enumerate(replies)]
    out = rule.aggregate(updates, current)
    # mod0: clients 0 (rank 4, n 30) and 1 (rank 2, n 10): rank <= 6, so the rank-4 SVD is a truncation;
    # mod1: clients 0 and 2 (ranks 4 + 1 = 5 > 4) likewise. Compare with numpy's best rank-4 approximation.
    for module, trainers in (("mod0", [0, 1]), ("mod1", [0, 2])):
        total = sum(replies[i][1] for i in trainers)
        exact = sum(
            replies[i][1] / total * (replies[i][0][module + LORA_B] @ replies[i][0][module + LORA_A]).double().numpy()
            for i in trainers
        )
        u, s, vh = np.linalg.svd(exact)
        best = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
        np.testing.assert_allclose((out[module + LORA_B] @ out[module + LORA_A]).numpy(), best, atol=1e-4)
    assert torch.equal(out["mod2" + LORA_A], current["mod2" + LORA_A])
    assert rule.round_metrics()["modules_trained"] == 2 and rule.round_metrics()["modules_kept"] == 1


def test_masked_rule_on_whole_adapters_is_fedavg():
    current = global_state()
    states = [{k: v + i for k, v in current.items()} for i in range(3)]
    updates = [ClientUpdate(i, s, n) for i, (s, n) in enumerate(zip(states, [1, 2, 5], strict=True))]
    out = MaskedAveraging().aggregate(updates, current)
    for key in current:
        torch.testing.assert_close(out[key], sum(s[key] * n for s, n in zip(states, [1, 2, 5], strict=True)) / 8)


def test_bad_rank_merge_option():
    with pytest.raises(ValueError, match="rank-merge"):
        MaskedAveraging(rank_merge="zeros")


def test_check_partial_accepts_replies_and_names_problems(mixed_round):
    current, replies = mixed_round
    for state, _ in replies:
        check_partial(state, current, source="reply")
    broken = dict(replies[0][0])
    del broken["mod0" + LORA_B]
    with pytest.raises(ValueError, match="mod0: lora_A without lora_B"):
        check_partial(broken, current, source="reply")
    too_wide = dict(replies[1][0]) | {"mod0" + LORA_A: torch.zeros(5, 5), "mod0" + LORA_B: torch.zeros(6, 5)}
    with pytest.raises(ValueError, match="rank 5 outside"):
        check_partial(too_wide, current, source="reply")
    no_head = {k: v for k, v in replies[0][0].items() if k != "head.weight"}
    with pytest.raises(ValueError, match=r"missing keys.*head\.weight"):
        check_partial(no_head, current, source="reply")


def test_diagnostics_exactness_for_masked_mixed_ranks(mixed_round):
    """Product mode with ranks that fit is exact (error 0); padding is not, and the meter says so."""
    current = global_state()
    replies = [(client_reply(current, ["mod0"], 2, 1), 30.0), (client_reply(current, ["mod0", "mod1"], 2, 2), 10.0)]
    states = [effective_state(s, current) for s, _ in replies]
    exact, _ = product_average(replies, current)
    weights = [0.75, 0.25]
    updates = [ClientUpdate(i, s, int(n)) for i, (s, n) in enumerate(replies)]
    product = MaskedAveraging("product").aggregate(updates, current)
    padding = MaskedAveraging("padding").aggregate(updates, current)
    assert aggregate_error(states, weights, product, exact=exact) < 1e-5
    assert aggregate_error(states, weights, padding, exact=exact) > 1e-2


def test_effective_state_is_what_the_client_model_held(bundle):
    """Train with a plan on the real model: the adapter left in the model equals effective_state(reply)."""
    from copra_core.copra import BlockDropper
    from copra_core.training import RoundSchedule, train_local

    model = bundle.model
    current = bundle.initial_state()
    modules = [m[: -len(LORA_A)] for m in current if m.endswith(LORA_A)]
    plan = ClientPlan((modules[0],), 3)
    set_adapter_state(model, current)
    batches = bundle.task.train_batches(bundle.task.server_examples(16), 8, 2, seed=0, offset=0, group_by_length=True)
    dropper = BlockDropper(bundle.blocks, enabled=False, p0=1.0, full_at=1.0, seed=0)
    with restricted_training(model, plan):
        train_local(
            model, bundle.task, batches, schedule=RoundSchedule(1, 1, 2), dropper=dropper, lr=1e-2,
            weight_decay=0.01, device=bundle.device,
        )  # fmt: skip
    held = get_adapter_state(model)
    reply = partial_state(held, plan)
    assert set(k[: -len(LORA_A)] for k in reply if k.endswith(LORA_A)) == {modules[0]}
    assert reply[modules[0] + LORA_A].shape[0] == 3
    rebuilt = effective_state(reply, current)
    for key in held:
        torch.testing.assert_close(rebuilt[key], held[key], rtol=0, atol=0)
    # The frozen modules did not move (beyond the rank-3 truncation); the trained one did.
    assert torch.equal(held[modules[1] + LORA_A][:3], current[modules[1] + LORA_A][:3])
    assert not held[modules[1] + LORA_A][3:].any()
    assert not current[modules[0] + LORA_B].any() and held[modules[0] + LORA_B][:, :3].any()  # B = 0 moved
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # restored


# ---------------------------------------------------------------------- export
def test_export_round_trip_with_rank_pattern(bundle, tmp_path):
    """Modules at ranks 2, 5 and 8 plus unused ones: PeftModel.from_pretrained computes the same logits."""
    current = bundle.initial_state()
    modules = [k[: -len(LORA_A)] for k in current if k.endswith(LORA_A)]
    generator = torch.Generator().manual_seed(0)
    state = {k: v.clone() for k, v in current.items()}
    for module, rank in zip(modules[:3], (2, 5, 8), strict=True):
        state[module + LORA_B][:, :rank] = 0.05 * torch.randn(
            state[module + LORA_B].shape[0], rank, generator=generator
        )
    expected_ranks = dict.fromkeys(modules, 0) | dict(zip(modules[:3], (2, 5, 8), strict=True))
    assert effective_ranks(state) == expected_ranks
    out = export_allocated_adapter(bundle.model, state, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(m.removeprefix("base_model.model.") for m in modules[:3])
    assert sorted(config["rank_pattern"].values()) == [2, 5]
    expected, batch = _run_logits(bundle, state)
    torch.testing.assert_close(_reloaded_logits(bundle, out, batch), expected, rtol=1e-5, atol=1e-6)
    set_adapter_state(bundle.model, current)


def _run_logits(bundle, state: dict) -> tuple[torch.Tensor, dict]:
    """Logits of the run's own model holding ``state``, on a fixed evaluation batch."""
    set_adapter_state(bundle.model, state)
    batch = next(iter(bundle.task.eval_batches(bundle.task.server_examples(8), 8)))
    bundle.model.eval()
    with torch.no_grad():
        return bundle.model(**batch).logits, batch


def _reloaded_logits(bundle, adapter_dir: Path, batch: dict, prepare_base=None) -> torch.Tensor:
    """Logits of a fresh base model with the exported adapter loaded by ``PeftModel.from_pretrained``."""
    from copra_core.tasks import build_task

    base, _ = build_task(bundle.config).load_model()
    if prepare_base is not None:
        prepare_base(base)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()(**batch).logits


# ---------------------------------------------------------------------- downlink
@pytest.mark.parametrize("transport_dtype", ["float32", "float16"])
def test_downlink_leaves_out_seeded_modules_and_a_separately_built_client_rebuilds_them(transport_dtype):
    """Server and client build their models apart: the client's rebuilt adapter is the server's, bitwise."""
    from flwr.app import ArrayRecord

    from copra_core.adapters import from_array_record
    from copra_core.allocation.downlink import as_sent, fill_modules
    from copra_core.learner import ModelBundle
    from server.allocation import Allocator
    from tests.helpers import tiny_config

    config = tiny_config(**{"federation.transport-dtype": transport_dtype, "allocation.enabled": True})
    server, client = ModelBundle(config), ModelBundle(config)
    allocator = Allocator(config, server.initial_state())
    current = as_sent(server.initial_state(), transport_dtype)
    modules = [k[: -len(LORA_A)] for k in current if k.endswith(LORA_A)]
    trained = modules[1:3]
    generator = torch.Generator().manual_seed(0)
    for module in trained:  # a trained module: B moved, and A too
        current[module + LORA_B] = 0.1 * torch.randn(current[module + LORA_B].shape, generator=generator)
        current[module + LORA_A] = current[module + LORA_A] * 1.5
    current = as_sent(current, transport_dtype)  # the server's global adapter is always as sent
    sent, record = allocator.downlink(current)
    assert record is not None and list(record["modules"]) == [m for m in modules if m not in trained]
    assert set(sent) == {k for k in current if not k.endswith((LORA_A, LORA_B))} | {
        m + f for m in trained for f in (LORA_A, LORA_B)
    }
    wire = to_array_record(sent, transport_dtype)
    received = from_array_record(ArrayRecord(wire.to_torch_state_dict()))
    rebuilt = fill_modules(
        received, as_sent(client.initial_state(), transport_dtype), list(record["modules"]), int(record["crc32"])
    )
    assert set(rebuilt) == set(current)
    for key in current:
        assert torch.equal(rebuilt[key], current[key]), key
    # Nothing left at its seeded value: nothing omitted.
    assert allocator.downlink({k: v + 1 for k, v in current.items()})[1] is None


def test_downlink_refuses_a_client_whose_seeded_adapter_differs():
    from copra_core.adapters import AdapterMismatchError
    from copra_core.allocation.downlink import fill_modules, modules_checksum, without_modules

    seeded = global_state()
    modules = ["mod0", "mod1"]
    crc = modules_checksum(seeded, modules)
    assert fill_modules(without_modules(seeded, modules), seeded, modules, crc).keys() == seeded.keys()
    other = {k: v.clone() for k, v in seeded.items()}
    other["mod1" + LORA_A][0, 0] += 1e-6
    with pytest.raises(AdapterMismatchError, match="CRC32"):
        fill_modules(without_modules(seeded, modules), other, modules, crc)
    with pytest.raises(AdapterMismatchError, match=r"sent anyway.*mod0"):
        fill_modules(without_modules(seeded, ["mod1"]), seeded, modules, crc)
    with pytest.raises(AdapterMismatchError, match=r"not in this node's adapter.*mod7"):
        fill_modules(without_modules(seeded, modules), seeded, ["mod7"], crc)


# ---------------------------------------------------------------------- shortcut connections
@pytest.fixture(scope="module")
def shortcut_bundle():
    from copra_core.learner import model_bundle
    from tests.helpers import tiny_config

    return model_bundle(tiny_config(**{"lora.shortcuts": True}))


def _block_io(bundle, index: int, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Input hidden states and output hidden states of block ``index``."""
    from copra_core.lora import find_block_list

    _, blocks = find_block_list(bundle.model)
    seen: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs, output):
        seen["in"] = args[0] if args else kwargs["hidden_states"]
        seen["out"] = output[0] if isinstance(output, tuple) else output

    handle = blocks[index].register_forward_hook(grab, with_kwargs=True)  # after the shortcut's hook
    try:
        with torch.no_grad():
            bundle.model(**batch)
    finally:
        handle.remove()
    return seen["in"], seen["out"]


def test_shortcut_adds_scaled_b_a_h_to_the_block_output(shortcut_bundle, bundle):
    """block(h) + (alpha / r) B A h, against the block without the shortcut's LoRA; zero at B = 0."""
    current = shortcut_bundle.initial_state()
    shortcuts = sorted(k[: -len(LORA_A)] for k in current if k.endswith(LORA_A) and "block_shortcut" in k)
    assert len(shortcuts) == 2 and all(".layer.0." in shortcuts[0] or ".layer.1." in s for s in shortcuts)
    batch = next(iter(bundle.task.eval_batches(bundle.task.server_examples(8), 8)))
    batch = {k: v for k, v in batch.items() if k != "labels"}
    shortcut_bundle.model.eval()
    set_adapter_state(shortcut_bundle.model, current)
    h_zero, out_zero = _block_io(shortcut_bundle, 1, batch)
    # At B = 0 the model is the model without shortcuts (same seed, same adapter elsewhere).
    set_adapter_state(bundle.model, bundle.initial_state())
    bundle.model.eval()
    _, out_plain = _block_io(bundle, 1, batch)
    torch.testing.assert_close(out_zero, out_plain, rtol=0, atol=1e-6)

    module = shortcuts[1]
    state = {k: v.clone() for k, v in current.items()}
    state[module + LORA_B] = 0.05 * torch.randn(
        state[module + LORA_B].shape, generator=torch.Generator().manual_seed(1)
    )
    set_adapter_state(shortcut_bundle.model, state)
    h, out = _block_io(shortcut_bundle, 1, batch)
    torch.testing.assert_close(h, h_zero)  # block 0 is unchanged
    scaling = shortcut_bundle.config.lora.alpha / shortcut_bundle.config.lora.r
    expected = out_zero + scaling * h @ state[module + LORA_A].T @ state[module + LORA_B].T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    set_adapter_state(shortcut_bundle.model, current)


def test_shortcuts_are_candidates_of_their_block(shortcut_bundle):
    """CopRA drops a shortcut with its block; HeteroLoRA counts it at r (d + d)."""
    from copra_core.lora import lora_layers_by_block

    by_block = lora_layers_by_block(shortcut_bundle.model)
    for index, layers in enumerate(by_block):
        names = {name for layer in layers for name, m in shortcut_bundle.model.named_modules() if m is layer}
        assert any(n.endswith(f"layer.{index}.block_shortcut") for n in names), names
    costs = module_costs(shortcut_bundle.initial_state())
    hidden = shortcut_bundle.model.config.hidden_size
    shortcut_costs = [c for m, c in costs.items() if m.endswith("block_shortcut")]
    assert shortcut_costs == [shortcut_bundle.config.lora.r * 2 * hidden] * 2


def test_export_with_shortcuts_reloads_after_add_shortcuts(shortcut_bundle, tmp_path):
    from copra_core.shortcuts import add_shortcuts

    current = shortcut_bundle.initial_state()
    state = {k: v.clone() for k, v in current.items()}
    generator = torch.Generator().manual_seed(2)
    for key in state:
        if key.endswith(LORA_B):
            state[key][:, :4] = 0.05 * torch.randn(state[key].shape[0], 4, generator=generator)
    out = export_allocated_adapter(shortcut_bundle.model, state, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert any(m.endswith("block_shortcut") for m in config["target_modules"])
    expected, batch = _run_logits(shortcut_bundle, state)
    # The plain base lacks the modules: PEFT only warns and leaves the shortcuts out.
    with pytest.warns(RuntimeWarning, match="block_shortcut"):
        without = _reloaded_logits(shortcut_bundle, out, batch)
    assert not torch.allclose(without, expected, atol=1e-4)
    got = _reloaded_logits(shortcut_bundle, out, batch, prepare_base=add_shortcuts)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    set_adapter_state(shortcut_bundle.model, current)


def test_module_costs_are_rank_times_in_plus_out():
    state = global_state()
    assert module_costs(state) == {m: RANK * (d_in + d_out) for m, (d_out, d_in) in SHAPES.items()}


# ---------------------------------------------------------------------- through Flower
@pytest.mark.e2e
def test_allocated_federation_through_flower(tmp_path):
    """Dynamic allocation, clients at ranks 2 and 4, masked padding: budget, traffic, export."""
    from copra_core.checkpoint import load_checkpoint
    from tests.helpers import exported_accuracy
    from tests.helpers import run_tagged as _run

    out = tmp_path / "run"
    sets = {
        "lora.target-modules": "query,key,value,dense",
        "lora.shortcuts": "true",  # + one shortcut per block: 14 candidates
        "allocation.enabled": "true",
        "allocation.budget": "0.25",
        "allocation.every-rounds": "1",
        "allocation.scoring-batches": "2",
        "allocation.client-ranks": "2,4",
        "train.local-steps": "30",
    }
    args = [sys.executable, "-m", "simulations.cli", "simulate", "--quick", "--rounds", "2", "--strategy", "masked"]
    args += [item for key, value in sets.items() for item in ("--set", f"{key}={value}")]
    proc = _run([*args, "--out", str(out), "--no-display"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    state = load_checkpoint(out).tensors["global"]
    costs = module_costs(state)  # rank 8 costs
    dense = {k: v for k, v in state.items() if not k.endswith((LORA_A, LORA_B))}

    def nbytes_with(modules: set[str]) -> int:
        """Bytes of the dense tensors plus ``modules``' rank-8 factors."""
        factors = {m + f: state[m + f] for m in modules for f in (LORA_A, LORA_B)}
        return array_record_nbytes(to_array_record(dense | factors))

    trained_before: set[str] = set()
    for row in rows[1:]:
        assert row["allocation/candidates"] == 14 and row["allocation/modules"] == 3  # floor(0.25 * 14), re-scored
        enabled = row["allocation/enabled"]
        assert row["allocation/params"] == sum(costs[m] for m in enabled)
        # Down to both clients (scoring query, then training): the modules trained in earlier
        # rounds and the head; the others are still at their seeded value and left out.
        assert row["comm/modules_omitted"] == 14 - len(trained_before)
        assert row["comm/allocation_bytes_down"] == row["comm/bytes_down"] == 2 * nbytes_with(trained_before)
        assert row["comm/allocation_bytes_up"] == 2 * 8 * 14  # one float64 per candidate
        # Only the enabled modules travel up, at each client's rank (2 and 4 of 8), plus the head.
        replies = [partial_state(state, ClientPlan(tuple(enabled), rank)) for rank in (2, 4)]
        assert row["comm/bytes_up"] == sum(array_record_nbytes(to_array_record(r)) for r in replies)
        lora_floats = sum(costs[m] for m in enabled) * (2 + 4) // 8
        assert lora_floats == sum(v.numel() for r in replies for k, v in r.items() if k.endswith((LORA_A, LORA_B)))
        assert row["strategy/modules_trained"] == 3
        trained_before |= set(enabled)
        assert 0 <= row["aggregation/exactness_error"] < 1 and math.isfinite(row["barrier/jensen_factor"])
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["rank_pattern"] and set(adapter_config["rank_pattern"].values()) <= {2, 4}
    assert exported_accuracy(out) == pytest.approx(rows[-1]["global/accuracy"], abs=1e-12)


def test_screening_accepts_partial_replies_and_measures_their_own_block(mixed_round):
    from copra_core.screening import check_update, update_norm

    current, replies = mixed_round
    state = replies[1][0]  # mod0 at rank 2 and the head
    dtypes = dict.fromkeys(state, "float32")
    assert check_update(state, current, dtypes, "float32", 10, partial=True) is None
    assert "keys/shapes" in check_update(state, current, dtypes, "float32", 10)  # a whole-adapter rule refuses it
    assert update_norm(state, current) == pytest.approx(
        math.sqrt(
            float((state["mod0" + LORA_A] - current["mod0" + LORA_A][:2]).pow(2).sum())
            + float((state["mod0" + LORA_B] - current["mod0" + LORA_B][:, :2]).pow(2).sum())
            + float((state["head.weight"] - current["head.weight"]).pow(2).sum())
        ),
        rel=1e-6,
    )
