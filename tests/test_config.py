import tomllib
from pathlib import Path

import pytest

from copra_core.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_flat_round_trip_and_types():
    config = RunConfig()
    config.apply_overrides(["lora.r=4", "copra.enabled=false", "train.lr=0.01", "data.partition=iid"])
    assert (config.lora.r, config.copra.enabled, config.train.lr, config.data.partition) == (4, False, 0.01, "iid")
    again = RunConfig.from_flat(config.to_flat())
    assert again == config
    assert again.fingerprint() == config.fingerprint()


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
        ("data.partition=zipf", "data.partition"),
        ("diagnostics.grid=0.5", "diagnostics.grid"),
        ("train.lr-schedule=step", "train.lr-schedule"),
    ],
)
def test_validate_rejects(pair, key):
    config = RunConfig()
    config.apply_overrides([pair])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.validate()


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
