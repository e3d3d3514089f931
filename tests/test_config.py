import json
import tomllib
from pathlib import Path

import pytest
import torch

from copra_core.config import REGISTERED_DATASETS, ConfigError, RunConfig, field_help, key_choices, read_config_json

ROOT = Path(__file__).resolve().parents[1]
#: Every flat key whose dataclass field is typed ``Literal[...]``.
CHOICE_KEYS = [key for key in RunConfig().to_flat() if key_choices(key)]


def test_flat_round_trip_and_types():
    config = RunConfig()
    config.apply_overrides(["lora.r=4", "copra.enabled=false", "train.lr=0.01", "data.partition=iid"])
    assert (config.lora.r, config.copra.enabled, config.train.lr, config.data.partition) == (4, False, 0.01, "iid")
    again = RunConfig.from_flat(config.to_flat())
    assert again == config
    assert again.fingerprint() == config.fingerprint()


def test_config_json_is_the_flat_config_and_reads_back(tmp_path):
    config = RunConfig()
    config.apply_overrides(["lora.r=4", "train.lr-schedule=linear", "strategy.options=trim-fraction=0.2"])
    config.out_dir = str(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(config.to_json())  # what the server writes into the out-dir
    assert json.loads(path.read_text()) == config.to_flat()  # one format: Flower's flat keys
    assert read_config_json(path) == config.to_flat()
    assert RunConfig.from_flat(read_config_json(path)) == config


def test_nested_config_json_of_earlier_versions_reads_as_flat_keys(tmp_path):
    """Runs written before config.json was flat nest the sections (snake_case): same keys once read."""
    config = RunConfig()
    config.apply_overrides(["lora.target-modules=q_proj,v_proj", "causal-lm.max-new-tokens=7", "seed=3"])
    nested: dict[str, object] = {}
    for key, value in config.to_flat().items():
        section, _, name = key.rpartition(".")
        target = nested.setdefault(section.replace("-", "_"), {}) if section else nested
        target[name.replace("-", "_")] = value
    assert nested["causal_lm"]["max_new_tokens"] == 7 and nested["out_dir"] == config.out_dir
    path = tmp_path / "config.json"
    path.write_text(json.dumps(nested))
    assert read_config_json(path) == config.to_flat()


def test_committed_nested_config_json_still_reads():
    """docs/results/causal_lm_demo holds a run of the nested era; every key it has is a config key."""
    path = ROOT / "docs" / "results" / "causal_lm_demo" / "config.json"
    flat = read_config_json(path)
    assert flat["task"] == "causal_lm" and flat["lora.target-modules"] == "q_proj,v_proj"
    assert RunConfig.from_flat(flat).causal_lm.max_new_tokens == flat["causal-lm.max-new-tokens"]


def test_unreadable_config_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json"):
        read_config_json(path)


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError, match=r"Unknown config key 'lora\.rank'.*lora\.r"):
        RunConfig().apply_overrides(["lora.rank=4"])


@pytest.mark.parametrize(
    ("pair", "key"),
    [
        ("lora.r=four", "lora.r"),
        ("copra.enabled=maybe", "copra.enabled"),
        ("train.local-steps=2.5", "train.local-steps"),
    ],
)
def test_bad_values_name_the_key(pair, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        RunConfig().apply_overrides([pair])


@pytest.mark.parametrize(
    ("pair", "key"),
    [
        ("lora.r=0", "lora.r"),
        ("lora.r=-2", "lora.r"),
        ("copra.p0=1.5", "copra.p0"),
        ("diagnostics.grid=0.5", "diagnostics.grid"),
        ("device=gpu", "device"),
        ("federation.overwrite=true", "federation.overwrite"),  # together with resume below
    ],
)
def test_validate_rejects(pair, key):
    config = RunConfig()
    config.federation.resume = True
    config.apply_overrides([pair])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.validate()


def test_every_fixed_choice_key_is_typed():
    """The keys documented with a fixed set of values carry it on their field."""
    assert set(CHOICE_KEYS) == {
        "task",
        "init.method",
        "init.source",
        "init.svd",
        "train.lr-schedule",
        "data.partition",
        "data.bad-rows",
        "data.server-eval",
        "diagnostics.where",
        "federation.transport-dtype",
        "allocation.proxy",
        "causal-lm.template",
        "causal-lm.autocast",
    }


@pytest.mark.parametrize("key", CHOICE_KEYS)
def test_a_choice_key_rejects_another_value_naming_the_key_and_its_values(key):
    allowed = " | ".join(key_choices(key))
    message = rf"Config key '{key}' must be one of {allowed}, got 'bogus'"
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("|", r"\|")):
        RunConfig().apply_overrides([f"{key}=bogus"])
    # A value set in code, not through the flat keys, is caught by validate.
    config = RunConfig()
    section, _, name = key.rpartition(".")
    owner = getattr(config, section.replace("-", "_")) if section else config
    setattr(owner, name.replace("-", "_"), "bogus")
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("|", r"\|")):
        config.validate()
    for value in key_choices(key):  # every declared value is accepted
        RunConfig().apply_overrides([f"{key}={value}"])


def test_a_near_miss_is_suggested():
    with pytest.raises(ConfigError, match=r"got 'dirichlett'\. Did you mean 'dirichlet'\?"):
        RunConfig().apply_overrides(["data.partition=dirichlett"])


def test_declared_values_are_the_registries_values():
    """The Literal types and the code that implements each value agree, both ways where the code is a registry."""
    from copra_core import data
    from copra_core.allocation.proxies import PROXIES
    from copra_core.init import initialiser
    from copra_core.tasks import TASKS, instruct_data
    from copra_core.training import lr_factor

    assert set(key_choices("task")) == set(TASKS)
    assert set(key_choices("allocation.proxy")) == set(PROXIES)
    assert set(REGISTERED_DATASETS) == set(data.DATASETS) | set(instruct_data.DATASETS)
    assert instruct_data.FEDIT_PARTITION in key_choices("data.partition")
    for method in key_choices("init.method"):
        initialiser(method)
    for schedule in key_choices("train.lr-schedule"):
        assert 0.0 <= lr_factor(schedule, 0.5) <= 1.0
    for dtype in key_choices("federation.transport-dtype"):
        assert isinstance(getattr(torch, dtype), torch.dtype)


def test_help_lists_the_declared_values():
    helps = field_help()
    for key in CHOICE_KEYS:
        assert helps[key][1].endswith(f"One of: {' | '.join(key_choices(key))}."), key


def test_pyproject_run_config_matches_defaults():
    """`flwr run .` must start from exactly the defaults `copra-fl simulate` uses."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]

    def flatten(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    assert dict(flatten(app_config)) == RunConfig().to_flat()
