"""Process helpers for the end-to-end tests' leak checks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

#: Processes a simulation starts: SuperLink, SuperExec, simulation runtime and Ray's.
FLOWER_AND_RAY = "flower-superlink|flower-superexec|flwr-simulation|flwr-serverapp|raylet|gcs_server|ray::"


def pgrep(pattern: str) -> set[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return {int(pid) for pid in out.stdout.split()} - {os.getpid()}


def alive(pid: int) -> bool:
    """Still running: neither gone nor a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def terminate(pids: set[int], timeout: float = 30.0) -> None:
    """SIGTERM, wait, then SIGKILL what is left (only pids the test started)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = {p for p in pids if alive(p)}
        if not pids:
            return


def leftovers(live: Callable[[], set[int]], grace: float = 30.0) -> dict[int, str]:
    """Processes ``live()`` still reports after ``grace`` seconds (Ray winds down asynchronously)."""
    deadline = time.monotonic() + grace
    while (pids := live()) and time.monotonic() < deadline:
        time.sleep(0.5)
    cmdlines = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            cmdlines[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    return cmdlines


class RunTag:
    """An environment variable that marks the processes one test's run starts.

    Ray's daemons are not children of the run's process, so they are found by pattern
    (``FLOWER_AND_RAY``); every process the run starts inherits the marker, which keeps
    other simulations on the same machine (another test session, a benchmark, a
    developer's run) from counting as this run's leftovers.
    """

    def __init__(self) -> None:
        self.name, self.value = "COPRA_TEST_RUN", uuid.uuid4().hex

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` plus the marker: the environment to start the run with."""
        return {**base, self.name: self.value}

    def carries(self, pid: int) -> bool:
        try:
            return f"{self.name}={self.value}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False

    def live(self) -> set[int]:
        """The run's Flower and Ray processes still running."""
        return {p for p in pgrep(FLOWER_AND_RAY) if alive(p) and self.carries(p)}
