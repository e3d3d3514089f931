"""docker-compose.yml on a real Docker engine: images built offline, the federation in containers, faults there.

tests/test_deployment.py runs the compose file's commands as processes; this module runs the
file itself. It builds every image without Docker Hub or a package index (deploy/build.sh:
the Flower images from deploy/flower.Dockerfile and the copra-fl image, from the wheels in
deploy/wheelhouse on a local base image), then, as a compose project of its own (certificates,
keys and FLWR_HOME in pytest's temporary folder, the SuperLink published on 127.0.0.1 at a
free port): registers two SuperNodes, starts them with their ClientApps (CPU profile), runs
two rounds with ``flwr run`` from this host and checks the run's files in the ``runs``
volume, the adapter reloaded with PEFT here; then a SuperNode with an unregistered key, a
ServerApp container killed after round 1 and resumed, a SuperNode container stopped
mid-round, and ``docker-compose down -v``.

Runs only when selected (``-m docker``; 7-29 min on the 2-core machine, so not in CI)
and skipped without a Docker engine. Needs, besides the engine:
``bash deploy/base-image.sh`` (the base image) and ``bash deploy/wheelhouse.sh`` (the wheels).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import (
    FLWR_RUN_CONFIG,
    exported_accuracy,
    flwr_run_config,
    free_port,
    metrics_rows,
    register_supernodes,
)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FEDERATION = "copra-fl-docker-test"
BASE_IMAGE = os.environ.get("COPRA_FL_DOCKER_BASE_IMAGE", "copra-fl/debian-python:bookworm")
#: Generous: on the busy 2-core machine one round of the small config took up to 4 min in containers.
RUN_TIMEOUT_S = 1200

pytestmark = pytest.mark.docker


def _local_images() -> dict[str, str]:
    """deploy/local-images.env: the compose variables that select the locally built images."""
    pairs = {}
    for line in (ROOT / "deploy" / "local-images.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            pairs[key.strip()] = value.strip()
    return pairs


@pytest.fixture(scope="module", autouse=True)
def _docker_selected(request) -> None:
    """Only with ``-m docker``, and only where a Docker engine answers."""
    if "docker" not in (request.config.option.markexpr or ""):
        pytest.skip("the Docker end-to-end test runs only when selected: pytest -m docker tests/test_docker.py")
    missing = [tool for tool in ("docker", "docker-compose") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no Docker engine: {', '.join(missing)} not installed")
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"no Docker engine: `docker info` failed: {info.stderr.strip()[-300:]}")


@dataclass
class Project:
    """One compose project of docker-compose.yml, and the host-side CLI calls against it."""

    tmp: Path
    name: str
    port: int

    def __post_init__(self) -> None:
        self.home = self.tmp / "flwr-home"
        self.home.mkdir()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.tmp / "certs" / "ca.crt"}"\n'
        )
        self.env = {
            **os.environ,
            **_local_images(),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.home),
            "COMPOSE_PROJECT_NAME": self.name,
            "COPRA_FL_CERTS_DIR": str(self.tmp / "certs"),
            "COPRA_FL_KEYS_DIR": str(self.tmp / "keys"),
            "COPRA_FL_SUPERLINK_PUBLISH": f"127.0.0.1:{self.port}",
        }

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert not check or proc.returncode == 0, f"docker-compose {' '.join(args)}: {proc.stderr[-3000:]}"
        return proc

    def docker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service).stdout

    def wait_for_log(self, service: str, pattern: str, timeout: float = 180, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.logs(service))) < count:
            assert time.monotonic() < deadline, (
                f"{service}: no '{pattern}' after {timeout}s: {self.logs(service)[-2000:]}"
            )
            time.sleep(1)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def flwr_run(self, run_config: str) -> subprocess.CompletedProcess:
        return self.flwr("run", str(ROOT), FEDERATION, "--stream", "--run-config", run_config, timeout=RUN_TIMEOUT_S)

    def start_run(self, run_config: str, log: Path) -> subprocess.Popen:
        """``flwr run`` in the background (for faults injected while it runs), output to ``log``."""
        return subprocess.Popen(
            [str(BIN / "flwr"), "run", str(ROOT), FEDERATION, "--stream", "--run-config", run_config],
            cwd=ROOT,
            env=self.env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )

    def fetch(self, name: str) -> Path:
        """A copy of the runs volume's ``name`` folder (copied out of the serverapp container)."""
        dest = self.tmp / "fetched" / name
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(exist_ok=True)
        proc = self.docker("cp", f"{self.container('serverapp')}:/app/runs/{name}", str(dest))
        assert proc.returncode == 0, proc.stderr
        return dest

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.name}"
        found = {}
        for kind, command in (
            ("containers", ["ps", "-a", "-q", "--filter", label]),
            ("networks", ["network", "ls", "-q", "--filter", label]),
            ("volumes", ["volume", "ls", "-q", "--filter", label]),
        ):
            found[kind] = self.docker(*command).stdout.split()
        return {kind: ids for kind, ids in found.items() if ids}


def _container_path(name: str) -> str:
    return f"/app/runs/{name}"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Iterator[Project]:
    """Images built offline; SuperLink, two registered SuperNodes with their ClientApps, the ServerApp runner."""
    tmp = tmp_path_factory.mktemp("docker")
    if subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True).returncode != 0:
        pytest.fail(
            f"base image {BASE_IMAGE} is missing: bash deploy/base-image.sh (or set COPRA_FL_DOCKER_BASE_IMAGE)"
        )
    start = time.monotonic()
    build = subprocess.run(
        ["bash", str(ROOT / "deploy" / "build.sh"), BASE_IMAGE], capture_output=True, text=True, timeout=3600
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-3000:]
    print(f"\n[docker] images built in {time.monotonic() - start:.0f} s:\n{build.stderr.strip()}")

    subprocess.run(["bash", str(ROOT / "deploy" / "certs.sh"), str(tmp / "certs")], check=True, capture_output=True)
    subprocess.run(["bash", str(ROOT / "deploy" / "keys.sh"), "3", str(tmp / "keys")], check=True, capture_output=True)
    net = Project(tmp, f"copra-fl-test-{uuid.uuid4().hex[:8]}", free_port())
    try:
        net.compose("up", "-d", "superlink")
        net.wait_for_log("superlink", r"Uvicorn running on https://0\.0\.0\.0:9093")
        keys = [str(tmp / "keys" / f"supernode-{i}.pub") for i in (1, 2)]  # supernode-3 stays unregistered
        register_supernodes(FEDERATION, keys, net.env)
        net.compose("--profile", "cpu", "up", "-d")
        for i in (1, 2):
            net.wait_for_log(f"supernode-{i}", r"SuperNode ID")
        yield net
    finally:
        for service in ("superlink", "serverapp", "supernode-1", "supernode-2", "clientapp-1-cpu", "clientapp-2-cpu"):
            (tmp / f"{service}.log").write_text(net.compose("logs", "--no-color", service, check=False).stdout)
        net.compose("down", "-v", "--remove-orphans", check=False)


def test_published_port_is_loopback_only_and_containers_share_one_private_network(project):
    services = ("superlink", "serverapp", "supernode-1", "supernode-2", "clientapp-1-cpu", "clientapp-2-cpu")
    for service in services:
        info = json.loads(project.docker("inspect", project.container(service)).stdout)[0]
        assert set(info["NetworkSettings"]["Networks"]) == {f"{project.name}_default"}, service
        published = {port: bind for port, bind in info["NetworkSettings"]["Ports"].items() if bind}
        if service == "superlink":
            assert published == {"9093/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(project.port)}]}
        else:
            assert not published, f"{service} publishes {published}"


def test_a_supernode_with_an_unregistered_key_is_refused(project):
    """supernode-2's command and image, with the key of supernode-3 (never registered)."""
    command = [
        "--superlink",
        "superlink:9093",
        "--root-certificates",
        "/app/certificates/ca.crt",
        "--auth-supernode-private-key",
        "/app/keys/stranger",
        "--node-config",
        "partition-id=1 num-partitions=2",
    ]
    proc = project.compose(
        "run",
        "--rm",
        "--no-deps",
        "-v",
        f"{project.tmp / 'keys' / 'supernode-3'}:/app/keys/stranger:ro",
        "supernode-2",
        *command,
        timeout=300,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "Failed to activate SuperNode" in output, output[-3000:]


def test_two_rounds_in_containers_write_the_run_and_a_peft_adapter(project):
    start = time.monotonic()
    proc = project.flwr_run(flwr_run_config(Path(_container_path("two-rounds"))))
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"\n[docker] two rounds ({FLWR_RUN_CONFIG}) in {elapsed:.0f} s")
    out = project.fetch("two-rounds")
    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2], proc.stdout[-3000:]
    assert all(r["clients/sampled"] == 2 and r["clients/missing"] == 0 for r in rows[1:]), rows
    assert (out / "report.md").read_text().startswith("#")
    # The adapter the containers wrote, loaded with PEFT on this host (base model per the run's
    # config.json), scores what the run reported.
    assert exported_accuracy(out) == pytest.approx(rows[-1]["global/accuracy"])


def test_a_killed_serverapp_container_resumes_from_its_checkpoint(project):
    from copra_core.checkpoint import load_checkpoint

    name = "resumed"
    # Train messages only (each message starts a ClientApp process); rounds long enough to kill in round 2.
    extra = {"train.local-steps": 12, "federation.fraction-evaluate": 0.0}
    config = flwr_run_config(Path(_container_path(name)), extra)
    log = project.tmp / "first-run.log"
    first = project.start_run(config, log)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            assert time.monotonic() < deadline, f"no round-1 checkpoint after {RUN_TIMEOUT_S} s"
            assert first.poll() is None, f"the first run ended before round 1: {log.read_text()[-3000:]}"
            cp = project.docker(
                "cp", f"{project.container('serverapp')}:{_container_path(name)}/.", str(project.tmp / "probe")
            )
            probe = project.tmp / "probe"
            if cp.returncode == 0 and (probe / "checkpoint.safetensors").exists() and load_checkpoint(probe).round >= 1:
                break
            time.sleep(2)
        killed = project.docker("kill", project.container("serverapp"))
        assert killed.returncode == 0, killed.stderr
    finally:
        first.kill()
        first.wait(timeout=60)
    killed_at = project.fetch(name)
    before = metrics_rows(killed_at)
    done = load_checkpoint(killed_at).round
    assert done == 1, f"killed too late: round {done} checkpointed"

    project.compose("start", "serverapp")  # the same container, started again
    proc = project.flwr_run(flwr_run_config(Path(_container_path(name)), {**extra, "federation.resume": True}))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = project.fetch(name)
    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2], proc.stdout[-3000:]
    assert rows[: done + 1] == before[: done + 1]  # the checkpointed rounds are kept, not recomputed
    assert load_checkpoint(out).round == 2
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_a_supernode_container_stopped_mid_round_does_not_end_the_run(project):
    """Last on the shared project: it leaves one SuperNode."""
    received = len(re.findall(r"Receiving: train message", project.logs("supernode-2")))
    extra = {
        "federation.min-train-nodes": 1,
        "federation.round-timeout-s": 300.0,
        "federation.fraction-evaluate": 0.0,
    }
    log = project.tmp / "stopped-node-run.log"
    run = project.start_run(flwr_run_config(Path(_container_path("node-stopped")), extra), log)
    try:
        # Stop supernode-2 as soon as it has its round-1 training message (its ClientApp is still starting).
        project.wait_for_log("supernode-2", r"Receiving: train message", timeout=RUN_TIMEOUT_S, count=received + 1)
        project.compose("stop", "supernode-2")
        run.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=60)
    output = log.read_text()
    assert run.returncode == 0, output[-3000:]
    rows = metrics_rows(project.fetch("node-stopped"))
    assert [r["round"] for r in rows] == [0, 1, 2], output[-3000:]
    first, second = rows[1], rows[2]
    assert first["clients/sampled"] == 2 and first["clients/missing"] == 1, first
    assert len(first["clients"]) == 1  # aggregated over the node that replied
    assert second["clients/sampled"] == 1 and second["clients/missing"] == 0, second  # live nodes only


def test_down_v_leaves_no_container_network_or_volume(project):
    assert project.leftovers(), "the project should exist before `down`"
    project.compose("down", "-v")
    assert project.leftovers() == {}
