"""Helpers shared by several test modules (fixtures stay in conftest.py).

Test modules import from here, never from one another.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

from copra_core.config import RunConfig, read_config_json
from tests.processes import RunTag, leftovers

ROOT = Path(__file__).resolve().parents[1]


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_tagged(args: list[str], cwd: Path, timeout: int = 600, env: dict[str, str] | None = None):
    """Run ``args`` with the repository on PYTHONPATH; fail the test if it leaves Flower or Ray processes.

    Returns the ``subprocess.CompletedProcess`` (stdout and stderr captured as text).
    """
    tag = RunTag()
    base = dict(os.environ if env is None else env)
    base["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), base.get("PYTHONPATH", "")] if p)
    proc = subprocess.run(args, cwd=cwd, env=tag.env(base), capture_output=True, text=True, timeout=timeout)
    leaked = leftovers(tag.live)
    assert not leaked, f"processes left running: {leaked}"
    return proc


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- `flwr run` on small settings
#: A 2-block model, 2 clients, 2 rounds and small samples, for tests of the `flwr run` and
#: deployment paths (not of learning).
FLWR_RUN_CONFIG: dict[str, object] = {
    "model.num-hidden-layers": 2,
    "model.max-length": 32,
    "federation.clients": 2,
    "federation.rounds": 2,
    "train.local-steps": 4,
    "train.batch-size": 8,
    "data.partition": "iid",
    "data.eval-size": 64,
    "data.val-max": 16,
    "diagnostics.sample-size": 32,
    "diagnostics.pairs": 1,
    "diagnostics.grid": "0,0.5,1",
}


def flwr_run_config(out_dir: Path, extra: dict[str, object] | None = None) -> str:
    """``FLWR_RUN_CONFIG`` as ``k=v`` pairs for ``--run-config``: TOML values, strings in single quotes."""

    def toml(value: object) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, str):
            return f"'{value}'"
        return repr(value)

    items = {**FLWR_RUN_CONFIG, **(extra or {}), "out-dir": str(out_dir)}
    return " ".join(f"{k}={toml(v)}" for k, v in items.items())


# ---------------------------------------------------------------------- exported adapters
def load_exported(run_dir: Path):
    """(config, task, PeftModel) of a finished run, loaded from its config.json and adapter/."""
    from peft import PeftModel

    from copra_core.base_offset import apply_saved_offsets
    from copra_core.shortcuts import add_shortcuts
    from copra_core.tasks import build_task

    config = RunConfig.from_flat(read_config_json(run_dir / "config.json"))
    task = build_task(config)
    base, _ = task.load_model()
    if config.lora.shortcuts:  # the modules the adapter's shortcuts live in (copra_core/shortcuts.py)
        add_shortcuts(base)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    if (run_dir / "base_offset.safetensors").exists():
        apply_saved_offsets(model, run_dir / "base_offset.safetensors")
    return config, task, model


def exported_accuracy(run_dir: Path) -> float:
    """Accuracy of the run's exported adapter, loaded the way a user would, on the run's eval set.

    With ``base_offset.safetensors`` present (strategies that move the base) it is applied
    as docs/strategies.md says.
    """
    import torch

    config, task, model = load_exported(run_dir)
    examples = task.server_examples(config.data.eval_size)
    correct = 0
    with torch.no_grad():
        for batch in task.eval_batches(examples, 64):
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(examples)


def message_from(content, message_type: str, src_node_id: int = 0, dst_node_id: int = 0, group_id: str = "1"):
    """A Message as the server receives it (metadata filled in), for tests of reply handling."""
    from flwr.app import Message, Metadata

    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=src_node_id,
        dst_node_id=dst_node_id,
        reply_to_message_id="m",
        group_id=group_id,
        created_at=0.0,
        ttl=60.0,
        message_type=message_type,
    )
    return Message(content, metadata=metadata)


def register_supernodes(federation: str, public_keys: list[str], env: dict[str, str]) -> None:
    """Register the SuperNodes' public keys with the SuperLink (deploy/register.sh), every one of them."""
    proc = subprocess.run(
        ["bash", str(ROOT / "deploy" / "register.sh"), federation, *public_keys],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    registered = proc.stdout.count("registered successfully")
    assert proc.returncode == 0 and registered == len(public_keys), proc.stdout + proc.stderr
