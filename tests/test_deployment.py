"""docker-compose.yml, and the same topology run as real processes on 127.0.0.1.

There is no Docker engine on these machines, so the compose file is checked with
``docker-compose config`` and its commands are then run as processes: every flag comes
from the compose file; only addresses (service names -> 127.0.0.1, free ports) and
container paths (-> this test's temporary folder) are substituted, and the test asserts
that nothing else differs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.processes import alive, leftovers, pgrep, terminate
from tests.test_flwr_run import _run_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: Image -> the program its entrypoint runs (official Flower images; ours is FROM flwr/superexec).
ENTRYPOINTS = {
    "flwr/superlink": "flower-superlink",
    "flwr/supernode": "flower-supernode",
    "copra-fl": "flower-superexec",
}
FEDERATION = "copra-fl-loopback"


def compose_config() -> dict:
    """The compose file as Docker would run it (``docker-compose config``: anchors, env, profiles resolved)."""
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed (scripts/test.sh installs it: apt-get install docker-compose)")
    proc = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "--profile", "gpu", "--profile", "cpu", "config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_compose_file_is_valid_and_secure_by_default():
    services = compose_config()["services"]
    assert set(services) == {
        "superlink",
        "serverapp",
        "supernode-1",
        "supernode-2",
        "clientapp-1",
        "clientapp-2",
        "clientapp-1-cpu",
        "clientapp-2-cpu",
    }
    link = services["superlink"]["command"]
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"):
        assert flag in link
    assert "--insecure" not in link
    # The SuperLink's database lives on the named volume, not in the container.
    assert "superlink-state:/app/state:rw" in services["superlink"]["volumes"]
    for i in (1, 2):
        node = services[f"supernode-{i}"]["command"]
        assert node[node.index("--auth-supernode-private-key") + 1] == f"/app/keys/supernode-{i}"
        assert "--root-certificates" in node and "--insecure" not in node
        assert f"partition-id={i - 1} num-partitions=2" in node
        gpu = services[f"clientapp-{i}"]
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        assert gpu["profiles"] == ["gpu"] and services[f"clientapp-{i}-cpu"]["profiles"] == ["cpu"]
        assert "deploy" not in services[f"clientapp-{i}-cpu"]
        assert gpu["command"] == services[f"clientapp-{i}-cpu"]["command"]
    assert services["serverapp"]["command"][:2] == ["--runtime-api-address", "superlink:9093"]
    for name in ("serverapp", "clientapp-1"):
        env = services[name]["environment"]
        assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and env["FLWR_TELEMETRY_ENABLED"] == "0"


def test_gpu_ids_are_configurable():
    env = dict(os.environ, COPRA_FL_GPU_IDS_2="3")
    proc = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "--profile", "gpu", "config"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    services = yaml.safe_load(proc.stdout)["services"]
    ids = [
        services[f"clientapp-{i}"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for i in (1, 2)
    ]
    assert ids == [["0"], ["3"]]


# ---------------------------------------------------------------------- processes on loopback
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Loopback:
    """The compose topology as processes: commands from the compose file, addresses substituted."""

    tmp: Path
    services: dict
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home = self.tmp / "flwr-home"
        self.home.mkdir()
        self.ports = {name: _free_port() for name in self.services if name.startswith(("superlink", "supernode"))}
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.home),
            "PYTHONPATH": str(ROOT),
        }
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
            f'address = "127.0.0.1:{self.ports["superlink"]}"\nroot-certificates = "{self.tmp / "certs" / "ca.crt"}"\n'
        )

    def translate(self, service: str, args: list[str]) -> list[str]:
        """Compose arguments -> loopback arguments: only addresses and container paths change."""
        out = []
        for arg in args:
            arg = str(arg)
            for name, port in self.ports.items():
                arg = arg.replace(f"{name}:9093", f"127.0.0.1:{port}").replace(f"{name}:9094", f"127.0.0.1:{port}")
            arg = arg.replace("/app/certificates", str(self.tmp / "certs")).replace("/app/keys", str(self.tmp / "keys"))
            arg = arg.replace("/app/state", str(self.tmp / "state")).replace("0.0.0.0", "127.0.0.1")
            out.append(arg)
        if "--port" in out:  # each process on this host needs its own port
            out[out.index("--port") + 1] = str(self.ports[service])
        return out

    def command(self, service: str, **replace: str) -> list[str]:
        spec = self.services[service]
        program = next(p for image, p in ENTRYPOINTS.items() if spec["image"].startswith(image))
        args = self.translate(service, spec["command"])
        args = [replace.get(a, a) for a in args]
        return [str(BIN / program), *args]

    def service_env(self, service: str) -> dict[str, str]:
        env = {
            k: str(v).replace("/app/data", str(ROOT / "data")) for k, v in self.services[service]["environment"].items()
        }
        return {**self.env, **env}

    def start(self, name: str, service: str, **replace: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            self.command(service, **replace),
            cwd=self.tmp,
            env=self.service_env(service),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, pattern: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log(name)):
            assert self.procs[name].poll() is None, f"{name} exited: {self.log(name)[-2000:]}"
            assert time.monotonic() < deadline, f"{name}: no '{pattern}' after {timeout}s: {self.log(name)[-2000:]}"
            time.sleep(0.3)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def kill(self, name: str) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=30)

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        terminate({p.pid for p in self.procs.values() if alive(p.pid)})
        # Task processes the SuperExecs started, and anything else holding this FLWR_HOME.
        marker = f"FLWR_HOME={self.home}\0".encode()
        ours = set()
        for pid in pgrep("flwr|flower"):
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{pid}/environ").read_bytes():
                    ours.add(pid)
        terminate(ours)


def _loopback(tmp: Path) -> Loopback:
    subprocess.run(["bash", str(ROOT / "deploy" / "certs.sh"), str(tmp / "certs")], check=True, capture_output=True)
    subprocess.run(["bash", str(ROOT / "deploy" / "keys.sh"), "4", str(tmp / "keys")], check=True, capture_output=True)
    (tmp / "state").mkdir()
    return Loopback(tmp, compose_config()["services"])


def _stop(net: Loopback) -> None:
    net.stop()
    leaked = leftovers(lambda: {p for p in pgrep(str(net.home)) if alive(p)})
    assert not leaked, f"processes left running: {leaked}"


@pytest.fixture
def loopback(tmp_path) -> Iterator[Loopback]:
    net = _loopback(tmp_path)
    try:
        yield net
    finally:
        _stop(net)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Iterator[Loopback]:
    """The compose file's federation (TLS, node auth, two SuperNodes), shared by the tests that
    only run apps on it: starting it costs a SuperLink, two SuperNodes and their SuperExecs."""
    net = _loopback(tmp_path_factory.mktemp("two-nodes"))
    try:
        _start_federation(net, nodes=2)
        yield net
    finally:
        _stop(net)


def _start_federation(net: Loopback, nodes: int) -> None:
    """SuperLink, key registration, ``nodes`` SuperNodes with their SuperExecs, the ServerApp runner."""
    net.start("superlink", "superlink")
    net.wait_for("superlink", r"Uvicorn running on https://127\.0\.0\.1")
    keys = [str(net.tmp / "keys" / f"supernode-{i}.pub") for i in range(1, nodes + 1)]
    proc = subprocess.run(
        ["bash", str(ROOT / "deploy" / "register.sh"), FEDERATION, *keys],
        env=net.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.count("registered successfully") == nodes, proc.stdout + proc.stderr
    for i in range(1, nodes + 1):
        # Nodes beyond the compose file's two reuse supernode-2's command with their own key and partition.
        service = f"supernode-{min(i, 2)}"
        replace = {}
        if i > 2:
            net.ports[f"supernode-{i}"] = _free_port()
            replace = {
                str(net.tmp / "keys" / "supernode-2"): str(net.tmp / "keys" / f"supernode-{i}"),
                "partition-id=1 num-partitions=2": f"partition-id={i - 1} num-partitions={nodes}",
                str(net.ports["supernode-2"]): str(net.ports[f"supernode-{i}"]),
            }
        elif nodes != 2:
            replace = {f"partition-id={i - 1} num-partitions=2": f"partition-id={i - 1} num-partitions={nodes}"}
        net.start(f"supernode-{i}", service, **replace)
        net.wait_for(f"supernode-{i}", r"SuperNode ID")
        runtime = {f"127.0.0.1:{net.ports['supernode-2']}": f"127.0.0.1:{net.ports[f'supernode-{i}']}"} if i > 2 else {}
        net.start(f"clientapp-{i}", f"clientapp-{min(i, 2)}-cpu", **runtime)
    net.start("serverapp", "serverapp")


@pytest.mark.slow
def test_a_supernode_killed_mid_round_does_not_end_the_run(loopback):
    net = loopback
    _start_federation(net, nodes=3)
    out = net.tmp / "run"
    config = _run_config(
        out,
        {
            "federation.clients": 3,
            "federation.min-train-nodes": 2,
            "federation.round-timeout-s": 120.0,
            # Train messages only: each message starts a ClientApp process (seconds of imports).
            "federation.fraction-evaluate": 0.0,
        },
    )
    run = subprocess.Popen(
        [str(BIN / "flwr"), "run", str(ROOT), FEDERATION, "--stream", "--run-config", config],
        cwd=ROOT,
        env=net.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Kill node 3 (SuperNode and its SuperExec) as soon as it has its round-1 training message.
        net.wait_for("supernode-3", r"Receiving: train message", timeout=600)
        net.kill("supernode-3")
        net.kill("clientapp-3")
        output, _ = run.communicate(timeout=900)
    finally:
        if run.poll() is None:
            run.kill()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2], output[-3000:]
    first, second = rows[1], rows[2]
    assert first["clients/sampled"] == 3 and first["clients/missing"] == 1, first
    assert len(first["clients"]) == 2  # aggregated and diagnosed over the two that replied
    assert second["clients/sampled"] == 2 and second["clients/missing"] == 0, second  # live nodes only
    assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_tls_deployment_with_node_auth_carries_a_100_mb_adapter(two_nodes):
    """Messages far above gRPC's 4 MiB default: Flower 1.41 sends arrays in 5 MiB chunks."""
    net = two_nodes
    # The compose flags, with only addresses and paths substituted.
    link = net.command("superlink")
    assert link[1:] == net.translate("superlink", net.services["superlink"]["command"])
    assert "--enable-supernode-auth" in link and "--ssl-certfile" in link

    # A SuperNode whose key was never registered is refused.
    net.ports["supernode-4"] = _free_port()
    stranger = net.start(
        "supernode-4",
        "supernode-2",
        **{
            str(net.tmp / "keys" / "supernode-2"): str(net.tmp / "keys" / "supernode-4"),
            str(net.ports["supernode-2"]): str(net.ports["supernode-4"]),
        },
    )
    assert stranger.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in net.log("supernode-4")

    out = net.tmp / "run-100mb"
    big = {
        "model.num-hidden-layers": 0,  # all 6 blocks
        "lora.r": 384,
        "lora.target-modules": "query,key,value,attention.output.dense,intermediate.dense,output.dense",
        "lora.modules-to-save": "auto,pooler,word_embeddings",  # + 47 MB of embeddings
        "diagnostics.sample-size": 16,
        "data.eval-size": 32,
        # One round, train messages only: 100 MB down and up per client is the point; the
        # resume test below runs a deployment over several rounds.
        "federation.rounds": 1,
        "federation.fraction-evaluate": 0.0,
    }
    proc = net.flwr("run", str(ROOT), FEDERATION, "--stream", "--run-config", _run_config(out, big), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1], proc.stdout[-3000:]
    row = rows[1]
    assert row["clients/sampled"] == 2 and row["clients/missing"] == 0 and row["clients/rejected"] == 0
    assert row["comm/bytes_up"] / 2 > 100e6 and row["comm/bytes_down"] / 2 > 100e6  # per client
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 100e6
    assert (out / "checkpoint.safetensors").exists()


def _kill_serverapp(net: Loopback) -> None:
    """SIGKILL the ServerApp runner and the ServerApp process it started for the run (ours only)."""
    net.kill("serverapp")
    marker = f"FLWR_HOME={net.home}\0".encode()
    for pid in pgrep("flwr-serverapp"):
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{pid}/environ").read_bytes():
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_serverapp_resumes_from_its_checkpoint(two_nodes):
    """The ServerApp dies after round 1 of 2; `flwr run` with federation.resume=true continues at round 2.

    Last on the shared federation: it replaces the ServerApp runner.
    """
    from copra_core.checkpoint import load_checkpoint

    net = two_nodes
    out = net.tmp / "run-resumed"
    # Train messages only: each message starts a ClientApp process (seconds of imports).
    extra = {"federation.rounds": 2, "train.local-steps": 15, "federation.fraction-evaluate": 0.0}
    first_log = net.tmp / "first-run.log"
    first = subprocess.Popen(
        [str(BIN / "flwr"), "run", str(ROOT), FEDERATION, "--stream", "--run-config", _run_config(out, extra)],
        cwd=ROOT,
        env=net.env,
        stdout=first_log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 900
        while not ((out / "checkpoint.safetensors").exists() and load_checkpoint(out).round >= 1):
            assert time.monotonic() < deadline, "no round-1 checkpoint after 900 s"
            assert first.poll() is None, f"the first run ended before round 1: {first_log.read_text()[-3000:]}"
            time.sleep(0.5)
        _kill_serverapp(net)
    finally:
        first.kill()
        first.wait(timeout=60)
    before = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    done = load_checkpoint(out).round
    assert done == 1, f"killed too late: round {done} checkpointed"

    net.start("serverapp-2", "serverapp")  # a new ServerApp runner, as a restarted container would be
    resumed = {**extra, "federation.resume": True}
    proc = net.flwr("run", str(ROOT), FEDERATION, "--stream", "--run-config", _run_config(out, resumed), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2], proc.stdout[-3000:]
    assert rows[: done + 1] == before[: done + 1]  # the checkpointed rounds are kept, not recomputed
    assert load_checkpoint(out).round == 2
    assert (out / "adapter" / "adapter_model.safetensors").exists()
