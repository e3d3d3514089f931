"""``flwr run .`` on a local simulation federation, the way a Flower user runs the app.

The run goes through the whole Flower 1.41 CLI path: the FAB is built from this
checkout, a detached local SuperLink is started (federation address ``:local:``), the
app is installed into FLWR_HOME and the simulation runtime runs it on Ray. Everything
lives under pytest's temporary folders: FLWR_HOME (config.toml, the SuperLink's state
and log, installed apps), Ray's session files (RAY_TMPDIR) and the run's out-dir. The
SuperLink listens on a free port, so a SuperLink a user keeps running on Flower's
default port (39091) is neither reused nor disturbed. ``flwr`` has no command that
stops the local SuperLink: the test sends it SIGTERM, as docs/flwr_run.md tells users.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import FLWR_RUN_CONFIG, flwr_run_config, free_port
from tests.processes import FLOWER_AND_RAY, alive, carrying, leftovers, pgrep, terminate

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FEDERATION = "copra-local"
CLIENTS = int(FLWR_RUN_CONFIG["federation.clients"])


class LocalFederation:
    """A FLWR_HOME with one local simulation federation, and the CLI calls against it."""

    def __init__(self, home: Path, ray_tmp: Path) -> None:
        self.home = home
        self.port = free_port()
        self.before = pgrep(FLOWER_AND_RAY)
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\naddress = ":local:"\n'
        )
        self.env = {
            **os.environ,
            # flwr starts `flower-superlink` through PATH: use this environment's.
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_TMPDIR": str(ray_tmp),  # short: Ray's socket paths must stay under 107 bytes
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        }

    def flwr(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def superlink_pids(self) -> set[int]:
        return {p for p in pgrep(f"flower-superlink.*{re.escape(str(self.home))}/") if alive(p)}

    def processes(self) -> set[int]:
        """Live SuperLink/Ray processes started since, carrying this FLWR_HOME in their environment."""
        ours = carrying(pgrep(FLOWER_AND_RAY) - self.before, "FLWR_HOME", str(self.home))
        return {pid for pid in ours if alive(pid)}

    def stop(self) -> None:
        """Stop the local SuperLink as a user does (SIGTERM); its SuperExec exits with it."""
        terminate(self.superlink_pids())

    def leftovers(self) -> dict[int, str]:
        return leftovers(self.processes)


@pytest.fixture
def federation(tmp_path, tmp_path_factory):
    fed = LocalFederation(tmp_path / "flwr-home", tmp_path_factory.mktemp("ray"))
    yield fed
    # Safety net when the test failed before its own clean stop.
    fed.stop()
    terminate(fed.processes())


def test_flwr_run_local_simulation(federation, tmp_path):
    out_dir = tmp_path / "out"

    proc = federation.flwr(
        "run",
        ".",
        FEDERATION,
        "--stream",
        "--federation-config",
        f"num-supernodes={CLIENTS} client-resources-num-cpus=1",
        "--run-config",
        # One round: this test is about the `flwr run` path; several rounds are covered elsewhere.
        flwr_run_config(out_dir, {"federation.rounds": 1}),
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    log = (federation.home / "local-superlink" / "superlink.log").read_text(errors="replace")
    assert proc.returncode == 0, output[-4000:] + log[-2000:]
    assert f"127.0.0.1:{federation.port}" in output  # our own SuperLink, not one on the default port
    run_id = re.search(r"Successfully started run (\d+)", output)
    assert run_id, output[-4000:]

    # `flwr run --stream` exits 0 even when the run failed: ask the SuperLink.
    listed = federation.flwr("list", FEDERATION, "--run-id", run_id.group(1), "--format", "json", timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    status = json.loads(listed.stdout)["runs"][0]["status"]
    assert status == "finished:completed", f"run {status}:\n{output[-4000:]}"

    assert federation.superlink_pids(), "no local SuperLink found for this FLWR_HOME"
    federation.stop()
    assert not federation.superlink_pids()
    leaked = federation.leftovers()
    assert not leaked, f"processes left running: {leaked}"

    for name in ("metrics.jsonl", "report.md", "config.json"):
        assert (out_dir / name).is_file(), name
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out_dir / "adapter"))
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1]
    config = json.loads((out_dir / "config.json").read_text())
    assert config["model.num-hidden-layers"] == 2  # --run-config reached the ServerApp
