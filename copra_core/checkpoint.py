"""Per-round checkpoints of a federated run, and resuming from them.

After every round the server writes ``<out-dir>/checkpoint.safetensors``: one file with
every tensor the run needs to continue (global adapter, base offsets, the initial
factors LoRA-GA folds into the export, the aggregation rule's state) and, in the
safetensors header, the round, the flat config, the metrics rows so far, the server's
RNG states and the JSON-able state of server components (``server_state``: the
HeteroLoRA allocation in force). One file replaced atomically (temporary file + rename) means a kill
at any moment leaves either the previous round's checkpoint or this round's, never a
mix. Clients keep nothing between rounds (their batches, CopRA masks and optimiser are
derived from the seed and the round number), so the server's checkpoint is the whole
state of the federation.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from copra_core.adapters import AdapterState
from copra_core.atomic import default_file_mode, sibling_temp_path
from copra_core.config import ConfigError, RunConfig

FILE_NAME = "checkpoint.safetensors"
FORMAT = "copra-fl-checkpoint-1"
#: Config keys that may differ between a run and its resumption.
RESUME_FREE_KEYS = frozenset(
    {
        "out-dir",
        "federation.resume",
        "federation.overwrite",
        "federation.wait-for-nodes-s",
        "federation.round-timeout-s",
    }
)
#: What a run writes into its out-dir (server/app.py, copra_core/reporting.py, the causal_lm task):
#: an out-dir holding any of them holds a run (``prepare_out_dir``).
RUN_OUTPUTS = (
    "metrics.jsonl",
    FILE_NAME,
    "adapter",
    "config.json",
    "report.md",
    "accuracy.png",
    "barriers.png",
    "interpolation.png",
    "base_offset.safetensors",
    "generations.json",
    "generations.md",
    # Experiment tracking (copra_core/tracking/): an overwritten run's event files would
    # otherwise mix with the new run's in the same TensorBoard folder.
    "tensorboard",
    "mlflow",
    "wandb",
)
#: Config sections that only observe a run (experiment tracking reads the rows, computes
#: nothing): never part of a comparison, so a run may be resumed, or a benchmark cache
#: reused, with other trackers than the ones it was started with.
OBSERVER_SECTIONS = ("tracking.",)
#: Tensor groups, stored under "<group>/<key>".
GROUPS = ("global", "init_offsets", "initial", "rule_offsets", "rule")


class CheckpointError(ConfigError):
    """A checkpoint is missing, unreadable or belongs to a different config.

    A configuration error (``copra-fl`` exits with 2): the run was asked to resume from a
    folder without a usable checkpoint, or with a config the checkpoint was not written for.
    """


@dataclass
class Checkpoint:
    """Everything a resumed run needs, as of the end of ``round``."""

    round: int
    config: dict[str, Any]
    tensors: dict[str, AdapterState] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=dict)
    #: JSON-able state of server components, by name (e.g. "allocation": the decision in force).
    server_state: dict[str, Any] = field(default_factory=dict)


def _capture_rng() -> dict[str, Any]:
    """The server process's RNG states, JSON-able (Python's ``random`` drives Flower's node sampling)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}


def restore_rng(checkpoint: Checkpoint) -> None:
    """Put the server's RNGs back where they were when ``checkpoint`` was written."""
    version, internal, gauss = checkpoint.rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = checkpoint.rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(checkpoint.rng["torch"])


def save_checkpoint(out_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``out_dir/checkpoint.safetensors`` atomically (temporary file, then rename).

    The server's RNG states are captured now (``checkpoint.rng`` is filled on loading).
    """
    flat = {"rng/torch": torch.get_rng_state()}
    for group in GROUPS:
        for key, value in checkpoint.tensors.get(group, {}).items():
            flat[f"{group}/{key}"] = value.detach().to("cpu").contiguous()
    header = {
        "format": FORMAT,
        "round": checkpoint.round,
        "config": checkpoint.config,
        "metrics": checkpoint.metrics,
        "rng": _capture_rng(),
        "server_state": checkpoint.server_state,
    }
    path = out_dir / FILE_NAME
    tmp = sibling_temp_path(path)
    try:
        save_file(flat, tmp, metadata={"copra-fl": json.dumps(header)})
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(out_dir: Path) -> Checkpoint:
    """The checkpoint in ``out_dir``; a clear error naming the file otherwise."""
    path = Path(out_dir) / FILE_NAME
    if not path.exists():
        raise CheckpointError(f"No checkpoint to resume from: {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {}).get("copra-fl", "{}"))
        flat = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"Checkpoint {path} cannot be read: {err}") from err
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a copra-fl checkpoint (format {header.get('format')!r})")
    tensors: dict[str, AdapterState] = {group: {} for group in GROUPS}
    for name, value in flat.items():
        group, _, key = name.partition("/")
        if group in tensors:
            tensors[group][key] = value
    checkpoint = Checkpoint(
        round=int(header["round"]),
        config=header["config"],
        tensors=tensors,
        metrics=header["metrics"],
        rng=header["rng"] | {"torch": flat["rng/torch"]},
        server_state=header.get("server_state", {}),
    )
    return checkpoint


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], ignore: frozenset[str] = RESUME_FREE_KEYS
) -> list[str]:
    """Keys whose values differ (or exist on one side only), ignoring ``ignore`` (by default the
    keys a resumed run may change).

    A key that ``saved`` lacks but ``RunConfig`` has counts as its default: a key added to the
    config after ``saved`` was written defaults to the behaviour before it existed, so
    checkpoints and benchmark caches of earlier versions stay comparable.
    """
    defaults = RunConfig().to_flat()
    keys = {key for key in (set(saved) | set(current)) - ignore if not key.startswith(OBSERVER_SECTIONS)}
    return sorted(k for k in keys if saved.get(k, defaults.get(k, "<absent>")) != current.get(k, "<absent>"))


def check_resumable(checkpoint: Checkpoint, current: dict[str, Any], path: Path) -> None:
    """Refuse a config that differs from the checkpoint's, naming each differing key."""
    differing = config_differences(checkpoint.config, current)
    if differing:
        details = ", ".join(
            f"{k} ({checkpoint.config.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r})" for k in differing
        )
        raise CheckpointError(f"Cannot resume from {path}: the config differs from the checkpoint's in {details}")


def prepare_out_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Make ``out_dir`` ready for a run; refuse to lose the run it may already hold.

    An out-dir holding any of ``RUN_OUTPUTS`` is refused (ConfigError naming the folder and
    both ways out) unless ``resume`` (the run continues from its checkpoint) or ``overwrite``
    (the previous run's outputs are removed now, so none of them is mistaken for the new
    run's, e.g. another rule's ``base_offset.safetensors``). Other files are left alone.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"Config key 'out-dir': {out_dir} exists and is not a folder")
    found = [name for name in RUN_OUTPUTS if (out_dir / name).exists()]
    if found and not resume:
        if not overwrite:
            raise ConfigError(
                f"Config key 'out-dir': {out_dir} already holds a run ({', '.join(found)}). To continue it, "
                f"resume (copra-fl simulate --resume {out_dir}, or federation.resume=true); to replace it, "
                "overwrite (copra-fl simulate --overwrite, or federation.overwrite=true); or choose another out-dir."
            )
        for name in found:
            path = out_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
