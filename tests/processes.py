"""Process helpers for the end-to-end tests' leak checks (psutil, no pgrep or /proc parsing)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterable, Mapping

import psutil

#: Processes a simulation starts: SuperLink, SuperExec, simulation runtime and Ray's.
FLOWER_AND_RAY = "flower-superlink|flower-superexec|flwr-simulation|flwr-serverapp|raylet|gcs_server|ray::"


def pgrep(pattern: str) -> set[int]:
    """Pids whose command line matches the regular expression ``pattern`` (as ``pgrep -f``), not ours."""
    regex = re.compile(pattern)
    found = set()
    for proc in psutil.process_iter(["cmdline", "name"]):
        # Ray renames its workers (``ray::IDLE``): their name is the command line pgrep sees.
        text = " ".join(proc.info["cmdline"] or []) or (proc.info["name"] or "")
        if regex.search(text):
            found.add(proc.pid)
    return found - {os.getpid()}


def alive(pid: int) -> bool:
    """Still running: neither gone nor a zombie waiting to be reaped."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def carrying(pids: Iterable[int], name: str, value: str) -> set[int]:
    """Those of ``pids`` whose environment holds ``name=value`` (processes we cannot read are not ours)."""
    found = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).environ().get(name) == value:
                found.add(pid)
    return found


def terminate(pids: set[int], timeout: float = 30.0) -> None:
    """SIGTERM, wait, then SIGKILL what is left (only pids the test started)."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        deadline = time.monotonic() + timeout
        # Polled, not psutil.wait_procs: that would reap our Popen children behind subprocess's back.
        while (procs := [p for p in procs if alive(p.pid)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not procs:
            return


def leftovers(live: Callable[[], set[int]], grace: float = 30.0) -> dict[int, str]:
    """Processes ``live()`` still reports after ``grace`` seconds (Ray winds down asynchronously)."""
    deadline = time.monotonic() + grace
    while (pids := live()) and time.monotonic() < deadline:
        time.sleep(0.5)
    cmdlines = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            cmdlines[pid] = " ".join(psutil.Process(pid).cmdline())[:200]
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
        return bool(carrying([pid], self.name, self.value))

    def live(self) -> set[int]:
        """The run's Flower and Ray processes still running."""
        return {p for p in carrying(pgrep(FLOWER_AND_RAY), self.name, self.value) if alive(p)}
