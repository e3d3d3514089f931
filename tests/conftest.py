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

from tests.helpers import tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def bundle():
    """A process-wide 2-block LoRA model (built once per test session)."""
    from copra_core.learner import model_bundle

    return model_bundle(tiny_config())


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's scratch folder (FLWR_HOME, matplotlib and HF caches)."""
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


@pytest.fixture
def run_identity(monkeypatch):
    """Flower stamps every Message with the run id of the ServerApp process it is built in: fix it."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
