"""Aggregation rules against independent computations; registry and contract errors."""

import numpy as np
import pytest
import torch

import strategies
from copra_core.config import ConfigError
from strategies.base import AggregationRule, ClientUpdate, StrategyContractError
from strategies.linear import LinearAveraging


def _updates(num=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    template = {
        "m.lora_A.weight": torch.zeros(2, 5),
        "m.lora_B.weight": torch.zeros(4, 2),
        "head.weight": torch.zeros(2),
    }
    updates = [
        ClientUpdate(
            node_id=i, state={k: torch.randn(v.shape, generator=g) for k, v in template.items()}, num_examples=n
        )
        for i, n in zip(range(num), [5, 15, 80], strict=False)
    ]
    return updates, template


def test_linear_is_example_weighted_mean():
    updates, template = _updates()
    out = LinearAveraging().aggregate(updates, template)
    total = sum(u.num_examples for u in updates)
    for key in template:
        expected = sum(u.num_examples / total * u.state[key].double().numpy() for u in updates)
        np.testing.assert_allclose(out[key].numpy(), expected, rtol=1e-6, atol=1e-6)
        assert out[key].dtype == template[key].dtype


def test_registry_resolves_names_and_dotted_paths():
    assert strategies.resolve("linear") is LinearAveraging
    assert strategies.resolve("strategies.linear:LinearAveraging") is LinearAveraging
    assert isinstance(strategies.build("tests.test_strategies:FirstClientWins"), FirstClientWins)


class FirstClientWins(AggregationRule):
    """A user's rule: keep the first client's adapter."""

    name = "first"

    def aggregate(self, updates, current):
        return {k: v.clone() for k, v in updates[0].state.items()}


class NotARule:
    def aggregate(self, updates, current):
        return current


class Incomplete(AggregationRule):
    pass


class DropsKeys(AggregationRule):
    def aggregate(self, updates, current):
        return {k: v for k, v in list(current.items())[1:]}


class WrongShape(AggregationRule):
    def aggregate(self, updates, current):
        return {k: torch.zeros(1) for k in current}


class Explodes(AggregationRule):
    def aggregate(self, updates, current):
        raise RuntimeError("boom")


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        # A name that resolves to nothing is a config error (copra-fl exits with 2) ...
        ("lineer", ConfigError, r"unknown strategy 'lineer'.*Did you mean \['linear'\]"),
        ("no_such_module:Rule", ConfigError, "cannot import module 'no_such_module'"),
        ("tests.test_strategies:Missing", ConfigError, "has no 'Missing'"),
        # ... a class that breaks the rule contract is the rule's fault.
        ("tests.test_strategies:NotARule", StrategyContractError, "must subclass strategies.base.AggregationRule"),
        ("tests.test_strategies:Incomplete", StrategyContractError, r"does not implement \['aggregate'\]"),
    ],
)
def test_registry_errors(spec, error, message):
    with pytest.raises(error, match=message):
        strategies.build(spec)


@pytest.mark.parametrize(
    ("cls", "message"),
    [(DropsKeys, "output keys differ"), (WrongShape, "expected tensor"), (Explodes, "failed on a dry run")],
)
def test_dry_run_rejects_bad_outputs(cls, message):
    _, template = _updates()
    with pytest.raises(StrategyContractError, match=message):
        strategies.dry_run(cls(), template)


def _copy(tensors):
    return {key: value.clone() for key, value in tensors.items()}


def _assert_unchanged(before, after, what):
    assert before.keys() == after.keys(), what
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{what}: '{key}' changed"


def _valid_updates(rule, template, seed):
    """Perturbed copies of the template; A left as it is for a rule that freezes it (FFA)."""
    frozen_a = rule.client_overrides.get("lora.freeze-a", False)
    g = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(
            node_id=i,
            state={
                k: v.clone() if frozen_a and k.endswith(".lora_A.weight") else v + torch.randn(v.shape, generator=g)
                for k, v in template.items()
            },
            num_examples=n,
        )
        for i, n in enumerate([5, 15, 80])
    ]


@pytest.mark.parametrize("name", sorted(strategies.BUILTIN))
def test_dry_run_accepts_good_rules_without_touching_their_state(name):
    """The dry run aggregates a copy: the rule's state after a real round (server-optimiser
    moments and round counter, residual offsets, DARE's round) and the template stay as they were."""
    _, template = _updates()
    rule = strategies.build(name)
    rule.aggregate(_valid_updates(rule, template, seed=1), template)  # give stateful rules some state
    state, template_before = _copy(rule.state_dict()), _copy(template)
    strategies.dry_run(rule, template)
    _assert_unchanged(state, rule.state_dict(), f"{name}'s state")
    _assert_unchanged(template_before, template, "the template")
    strategies.dry_run(FirstClientWins(), template)
    _assert_unchanged(template_before, template, "the template")


@pytest.mark.parametrize("name", sorted(strategies.BUILTIN))
def test_rules_do_not_modify_their_inputs(name):
    """Over two rounds (stateful rules read their state in the second) neither the clients'
    tensors nor the current global adapter change."""
    _, template = _updates()
    rule = strategies.build(name)
    current = _copy(template)
    for round_seed in (1, 2):
        updates = _valid_updates(rule, current, seed=round_seed)
        sent, current_before = [_copy(u.state) for u in updates], _copy(current)
        out = rule.aggregate(updates, current)
        for k, (before, update) in enumerate(zip(sent, updates, strict=True)):
            _assert_unchanged(before, update.state, f"{name}: client {k}'s update")
        _assert_unchanged(current_before, current, f"{name}: the current adapter")
        current = out


def test_rules_import_without_peft_transformers_or_flower():
    """Rules are plain tensors in, tensors out: importing the package and every built-in
    rule's module in a fresh interpreter loads none of PEFT, transformers or Flower."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    modules = ["strategies", "copra_core.lowrank", *sorted({cls.__module__ for cls in strategies.BUILTIN.values()})]
    assert "strategies.fedopt" in modules and "strategies.dare" in modules
    heavy = ("peft", "transformers", "flwr")
    code = (
        "import importlib, json, sys\n"
        "for name in sys.argv[1:]:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(heavy)!r}))))"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", code, *modules], cwd=root, capture_output=True, text=True, timeout=300, check=True
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_product_svd_is_the_best_rank_r_approximation_of_the_exact_average():
    updates, template = _updates()
    rule = strategies.build("product_svd")
    out = rule.aggregate(updates, template)
    total = sum(u.num_examples for u in updates)
    a = [u.state["m.lora_A.weight"].double().numpy() for u in updates]
    b = [u.state["m.lora_B.weight"].double().numpy() for u in updates]
    exact = sum(u.num_examples / total * bi @ ai for u, ai, bi in zip(updates, a, b, strict=True))
    u_np, s_np, vh_np = np.linalg.svd(exact)
    best = (u_np[:, :2] * s_np[:2]) @ vh_np[:2]  # rank r = 2 (Eckart-Young)
    got = out["m.lora_B.weight"].double().numpy() @ out["m.lora_A.weight"].double().numpy()
    np.testing.assert_allclose(got, best, rtol=1e-5, atol=1e-5)
    expected_error = np.sqrt((s_np[2:] ** 2).sum() / (s_np**2).sum())
    assert rule.last_truncation_error == pytest.approx(expected_error, rel=1e-6)
    head = sum(u.num_examples / total * u.state["head.weight"].double().numpy() for u in updates)
    np.testing.assert_allclose(out["head.weight"].numpy(), head, rtol=1e-6, atol=1e-6)
    strategies.dry_run(rule, template)


def test_product_svd_is_exact_when_the_average_has_rank_r():
    """One client (or identical clients): re-factorisation reproduces B A exactly."""
    updates, template = _updates(num=1)
    out = strategies.build("product_svd").aggregate(updates, template)
    state = updates[0].state
    np.testing.assert_allclose(
        (out["m.lora_B.weight"] @ out["m.lora_A.weight"]).numpy(),
        (state["m.lora_B.weight"] @ state["m.lora_A.weight"]).numpy(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_federated_metrics_pool_the_clients_sums_not_their_means():
    """Perplexity of the pooled response tokens, not a mean of the clients' perplexities."""
    import math

    from flwr.app import MetricRecord, RecordDict

    from copra_core.tasks.causal_lm import CausalLMTask
    from server.metrics import pooled_metrics

    def reply(loss_sum: float, tokens: float, correct: float, examples: int) -> RecordDict:
        sums = {"loss_sum": loss_sum, "tokens": tokens, "correct": correct}
        loss = loss_sum / tokens
        metrics = {"loss": loss, "perplexity": math.exp(loss), "token_accuracy": correct / tokens}
        metrics |= {f"sum/{k}": v for k, v in sums.items()}
        return RecordDict({"metrics": MetricRecord({**metrics, "num-examples": examples})})

    # Client 0: 10 tokens at loss 2; client 1: 1 token at loss 5; 3 examples each.
    replies = [reply(20.0, 10.0, 4.0, 3), reply(5.0, 1.0, 1.0, 3)]
    summarise = lambda sums: CausalLMTask.summarise(None, sums)  # noqa: E731 (summarise uses no state)
    pooled = pooled_metrics(summarise)(replies, "num-examples")
    assert pooled["loss"] == pytest.approx(25 / 11)
    assert pooled["perplexity"] == pytest.approx(math.exp(25 / 11))
    assert pooled["token_accuracy"] == pytest.approx(5 / 11)
    assert set(pooled) == {"loss", "perplexity", "token_accuracy"}
    # Flower's example-weighted mean of the same replies: (e^2 + e^5) / 2, not the pooled value.
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    flower = aggregate_metricrecords(replies, "num-examples")
    assert flower["perplexity"] == pytest.approx((math.exp(2) + math.exp(5)) / 2)
    assert abs(flower["perplexity"] - pooled["perplexity"]) > 50
    # Replies without sums (another ClientApp) get Flower's mean.
    bare = [RecordDict({"metrics": MetricRecord({"loss": 1.0 + i, "num-examples": 1 + i})}) for i in range(2)]
    assert pooled_metrics(summarise)(bare, "num-examples")["loss"] == pytest.approx((1 * 1 + 2 * 2) / 3)
