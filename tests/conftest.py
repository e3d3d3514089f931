"""Shared fixtures; every test writes only under pytest's temporary folders."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# Before anything imports flwr, matplotlib or transformers.
_SESSION_TMP = tempfile.mkdtemp(prefix="copra-tests-")
os.environ.update(
    {
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_HOME": os.path.join(_SESSION_TMP, "flwr"),
        "MPLCONFIGDIR": os.path.join(_SESSION_TMP, "mpl"),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": os.path.join(_SESSION_TMP, "hf"),
        "TOKENIZERS_PARALLELISM": "false",
    }
)

from copra_core.config import RunConfig  # noqa: E402


def tiny_config(**overrides: object) -> RunConfig:
    """The real default model truncated to 2 blocks, small samples."""
    config = RunConfig.from_flat(
        {
            "model.num-hidden-layers": 2,
            "federation.clients": 2,
            "train.local-steps": 4,
            "train.batch-size": 8,
            "data.partition": "iid",
            "data.val-max": 16,
            "diagnostics.sample-size": 32,
        }
    )
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def bundle():
    """A process-wide 2-block LoRA model (built once per test session)."""
    from copra_core.learner import model_bundle

    return model_bundle(tiny_config())


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's scratch folder (FLWR_HOME, matplotlib and HF caches)."""
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)
