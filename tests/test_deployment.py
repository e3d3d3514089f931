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
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.helpers import flwr_run_config, free_port, register_supernodes
from tests.processes import alive, carrying, leftovers, pgrep, terminate

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: The program each kind of service runs: the entrypoints of Flower's superlink, supernode and
#: superexec images (ours is built FROM flwr/superexec). By service name, not image: the
#: images are overridable.
PROGRAMS = {
    "superlink": "flower-superlink",
    "supernode": "flower-supernode",
    "serverapp": "flower-superexec",
    "clientapp": "flower-superexec",
}
FEDERATION = "copra-fl-loopback"
#: Flags whose value is a file inside the container.
FILE_FLAGS = (
    "--ssl-ca-certfile",
    "--ssl-certfile",
    "--ssl-keyfile",
    "--root-certificates",
    "--auth-supernode-private-key",
    "--database",
)
#: Flags whose value is the ``host:port`` of another service.
ADDRESS_FLAGS = ("--superlink", "--runtime-api-address")


def kind(service: str) -> str:
    """superlink, supernode, serverapp or clientapp (service names are ``<kind>[-<i>[-cpu]]``)."""
    return service.split("-")[0]


def flag(command: list, name: str) -> str | None:
    """The value after ``name`` in a command (None without the flag)."""
    command = [str(arg) for arg in command]
    return command[command.index(name) + 1] if name in command else None


def mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only) of a resolved service's volumes."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):  # long syntax
            out[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
        else:
            source, target, *mode = volume.split(":")
            out[target] = (source, mode == ["ro"])
    return out


def mount_of(service: dict, path: str) -> tuple[str, str, bool] | None:
    """(source, path inside the source, read-only) of the volume that holds container ``path``."""
    for target, (source, read_only) in mounts(service).items():
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return source, path[len(target) :].lstrip("/"), read_only
    return None


def compose_config(env: dict[str, str] | None = None, profiles: tuple[str, ...] = ("gpu", "cpu")) -> dict:
    """The compose file as Docker would run it (``docker-compose config``: anchors, env, profiles resolved)."""
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed (scripts/test.sh installs it: apt-get install docker-compose)")
    args = ["docker-compose", "-f", str(ROOT / "docker-compose.yml")]
    for profile in profiles:
        args += ["--profile", profile]
    proc = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_config()


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[Path, Path]:
    """What deploy/certs.sh and deploy/keys.sh write, in a temporary folder: host path -> test path."""
    tmp = tmp_path_factory.mktemp("generated")
    subprocess.run(["bash", str(ROOT / "deploy" / "certs.sh"), str(tmp / "certs")], check=True, capture_output=True)
    subprocess.run(["bash", str(ROOT / "deploy" / "keys.sh"), "2", str(tmp / "keys")], check=True, capture_output=True)
    return {ROOT / "deploy" / "certificates": tmp / "certs", ROOT / "deploy" / "keys": tmp / "keys"}


def test_every_address_names_a_service_on_the_port_it_listens_on(compose):
    services = compose["services"]
    connections = 0
    for name, spec in services.items():
        for address_flag in ADDRESS_FLAGS:
            address = flag(spec["command"], address_flag)
            if address is None:
                continue
            host, port = address.rsplit(":", 1)
            assert host in services, f"{name}: {address_flag} {address} names no service"
            assert flag(services[host]["command"], "--port") == port, f"{name}: {host} does not listen on {port}"
            assert host in spec.get("depends_on", {}), f"{name} connects to {host} but may start before it"
            connections += 1
    # The ServerApp runner and each SuperNode connect to the SuperLink, each ClientApp to its SuperNode.
    assert connections == len(services) - 1
    # Only the SuperLink is reachable from outside, on the port it listens on.
    published = {name: spec["ports"] for name, spec in services.items() if spec.get("ports")}
    assert list(published) == ["superlink"]
    link_port = int(flag(services["superlink"]["command"], "--port"))
    targets = [
        p["target"] if isinstance(p, dict) else int(str(p).split("/")[0].rsplit(":", 1)[-1])
        for p in published["superlink"]
    ]
    assert targets == [link_port]


def test_connections_to_the_superlink_use_tls_and_registered_keys(compose, generated):
    """TLS on every connection that leaves a host; the server certificate is valid for the name nodes dial."""
    services = compose["services"]
    link = services["superlink"]
    assert "--insecure" not in link["command"] and "--enable-supernode-auth" in link["command"]
    ca = mount_of(link, flag(link["command"], "--ssl-ca-certfile"))
    certificate = mount_of(link, flag(link["command"], "--ssl-certfile"))
    for name, spec in services.items():
        address = flag(spec["command"], "--superlink") or flag(spec["command"], "--runtime-api-address")
        if address is None or not address.startswith("superlink:"):
            continue
        assert "--insecure" not in spec["command"], name
        # The CA the client verifies with is the one that signed the SuperLink's certificate.
        assert mount_of(spec, flag(spec["command"], "--root-certificates"))[:2] == ca[:2], name
        if kind(name) == "supernode":
            # Each SuperNode holds its own private key only.
            source, inside, read_only = mount_of(spec, flag(spec["command"], "--auth-supernode-private-key"))
            assert Path(source, inside).name == name and read_only, name
            assert not [t for t in mounts(spec) if "keys" in t and not t.endswith(name)], name
    host_cert = generated[Path(certificate[0])] / certificate[1]  # deploy/certificates, as mounted
    sans = subprocess.run(
        ["openssl", "x509", "-in", str(host_cert), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "DNS:superlink" in sans, sans


def test_every_file_a_command_names_is_mounted_and_generated(compose, generated):
    """Certificates and keys come from deploy/certs.sh and deploy/keys.sh; the SuperLink's state outlives it."""
    declared_volumes = set(compose.get("volumes", {}))
    checked = 0
    for name, spec in compose["services"].items():
        for file_flag in FILE_FLAGS:
            path = flag(spec["command"], file_flag)
            if path is None:
                continue
            mount = mount_of(spec, path)
            assert mount is not None, f"{name}: {file_flag} {path} is in no mounted volume"
            source, inside, read_only = mount
            if file_flag == "--database":
                # On a named volume, writable: the federation's state survives a new container.
                assert source in declared_volumes and not read_only, (name, source)
            else:
                host = Path(source, inside)
                root = next((r for r in generated if host.is_relative_to(r)), None)
                assert root, f"{name}: {path} comes from {host}, which no deploy script writes"
                assert (generated[root] / host.relative_to(root)).is_file(), (
                    f"{name}: {file_flag} {path}: not generated"
                )
                assert read_only, f"{name}: {source} should be mounted read-only"
            checked += 1
    # SuperLink: CA, certificate, key, database; each of the 2 SuperNodes: CA and key; ServerApp runner: CA.
    assert checked == 4 + 2 * 2 + 1


def test_supernodes_split_the_data_into_distinct_partitions(compose):
    nodes = {n: s for n, s in compose["services"].items() if kind(n) == "supernode"}
    partitions = []
    for name, spec in nodes.items():
        node_config = dict(item.split("=", 1) for item in flag(spec["command"], "--node-config").split())
        assert int(node_config["num-partitions"]) == len(nodes), name
        partitions.append(int(node_config["partition-id"]))
    assert sorted(partitions) == list(range(len(nodes)))


def test_each_supernode_gets_one_clientapp_per_profile(compose):
    """``--profile gpu`` reserves a GPU for every ClientApp, ``--profile cpu`` runs the same ones without."""
    services = compose["services"]
    nodes = [n for n in services if kind(n) == "supernode"]
    for profile in ("gpu", "cpu"):
        apps = {n: s for n, s in services.items() if kind(n) == "clientapp" and s.get("profiles") == [profile]}
        served = sorted(flag(s["command"], "--runtime-api-address").split(":")[0] for s in apps.values())
        assert served == sorted(nodes), profile
        for name, spec in apps.items():
            devices = spec.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
            gpus = [d for d in devices if "gpu" in d.get("capabilities", [])]
            assert len(gpus) == (1 if profile == "gpu" else 0), name
    for name, spec in services.items():
        if kind(name) == "clientapp" and name.endswith("-cpu"):
            assert spec["command"] == services[name.removesuffix("-cpu")]["command"], name


def test_every_flower_process_runs_without_runtime_installs_or_telemetry(compose):
    for name, spec in compose["services"].items():
        env = spec.get("environment", {})
        settings = (
            env.get("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"),
            env.get("FLWR_TELEMETRY_ENABLED"),
            env.get("FLWR_DISABLE_UPDATE_CHECK"),
        )
        assert settings == ("1", "0", "1"), name


def test_gpu_ids_are_configurable():
    services = compose_config(dict(os.environ, COPRA_FL_GPU_IDS_2="3"), profiles=("gpu",))["services"]
    ids = [
        services[f"clientapp-{i}"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for i in (1, 2)
    ]
    assert ids == [["0"], ["3"]]


# ---------------------------------------------------------------------- processes on loopback
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
        self.ports = {name: free_port() for name in self.services if name.startswith(("superlink", "supernode"))}
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
        args = self.translate(service, self.services[service]["command"])
        args = [replace.get(a, a) for a in args]
        return [str(BIN / PROGRAMS[kind(service)]), *args]

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
        terminate(carrying(pgrep("flwr|flower"), "FLWR_HOME", str(self.home)))


def _loopback(tmp: Path) -> Loopback:
    subprocess.run(["bash", str(ROOT / "deploy" / "certs.sh"), str(tmp / "certs")], check=True, capture_output=True)
    subprocess.run(["bash", str(ROOT / "deploy" / "keys.sh"), "4", str(tmp / "keys")], check=True, capture_output=True)
    (tmp / "state").mkdir()
    return Loopback(tmp, compose_config()["services"])


def _stop(net: Loopback) -> None:
    net.stop()
    leaked = leftovers(lambda: {p for p in pgrep(re.escape(str(net.home))) if alive(p)})
    assert not leaked, f"processes left running: {leaked}"


def test_loopback_commands_differ_from_the_compose_file_only_in_addresses_and_paths(compose, tmp_path):
    """What the process tests below run is the compose file's commands: every flag and value is
    kept except service addresses, container paths and listening ports."""
    net = Loopback(tmp_path, compose["services"])
    container_paths = ("/app/certificates", "/app/keys", "/app/state")
    for name, spec in compose["services"].items():
        original = [str(arg) for arg in spec["command"]]
        translated = net.command(name)
        assert Path(translated[0]).name == PROGRAMS[kind(name)]
        assert len(translated) == len(original) + 1, name
        for index, (before, after) in enumerate(zip(original, translated[1:], strict=True)):
            if before == after:
                continue
            if original[index - 1] == "--port":
                assert after == str(net.ports[name]), name
            elif before == "0.0.0.0":
                assert after == "127.0.0.1", name
            elif before.startswith(container_paths):
                assert after.startswith(str(tmp_path)) and Path(after).name == Path(before).name, (name, before)
            else:
                host = before.rsplit(":", 1)[0]
                assert host in compose["services"] and after == f"127.0.0.1:{net.ports[host]}", (name, before)
        assert [a for a in original if a.startswith("--")] == [a for a in translated if a.startswith("--")], name


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
    register_supernodes(FEDERATION, keys, net.env)
    for i in range(1, nodes + 1):
        # Nodes beyond the compose file's two reuse supernode-2's command with their own key and partition.
        service = f"supernode-{min(i, 2)}"
        replace = {}
        if i > 2:
            net.ports[f"supernode-{i}"] = free_port()
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


@pytest.mark.e2e
def test_a_supernode_killed_mid_round_does_not_end_the_run(loopback):
    net = loopback
    _start_federation(net, nodes=3)
    out = net.tmp / "run"
    config = flwr_run_config(
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


@pytest.mark.e2e
def test_tls_deployment_with_node_auth_carries_a_100_mb_adapter(two_nodes):
    """Messages far above gRPC's 4 MiB default: Flower 1.41 sends arrays in 5 MiB chunks."""
    net = two_nodes
    # A SuperNode whose key was never registered is refused.
    net.ports["supernode-4"] = free_port()
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
        "data.eval-size": 32,
        # One round of one step, train messages only, no diagnostics: 100 MB down and up per
        # client is the point; the resume test below runs a deployment over several rounds.
        "federation.rounds": 1,
        "train.local-steps": 1,
        "federation.fraction-evaluate": 0.0,
        "diagnostics.enabled": False,
    }
    proc = net.flwr("run", str(ROOT), FEDERATION, "--stream", "--run-config", flwr_run_config(out, big), timeout=1200)
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
    for pid in carrying(pgrep("flwr-serverapp"), "FLWR_HOME", str(net.home)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.e2e
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
        [str(BIN / "flwr"), "run", str(ROOT), FEDERATION, "--stream", "--run-config", flwr_run_config(out, extra)],
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
    proc = net.flwr(
        "run", str(ROOT), FEDERATION, "--stream", "--run-config", flwr_run_config(out, resumed), timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2], proc.stdout[-3000:]
    assert rows[: done + 1] == before[: done + 1]  # the checkpointed rounds are kept, not recomputed
    assert load_checkpoint(out).round == 2
    assert (out / "adapter" / "adapter_model.safetensors").exists()
