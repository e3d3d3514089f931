"""TensorBoard: event files under ``<out-dir>/tensorboard`` (``tensorboard --logdir <out-dir>``).

Written with PyTorch's ``SummaryWriter``, which needs the ``tensorboard`` package. Scalars are
stored as TensorBoard stores them, in float32; the config and the tags go to the Text tab,
the interpolation curves to the Images tab and report.md, at the end, to the Text tab.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from copra_core.tracking.base import RunInfo, Tracker

#: Folder under the run's out-dir; ``tensorboard --logdir runs/`` then lists every run by its folder.
FOLDER = "tensorboard"


class TensorBoardTracker(Tracker):
    """Event files a running TensorBoard picks up as each round ends (flushed every round)."""

    name = "tensorboard"

    def __init__(self, run: RunInfo) -> None:
        super().__init__(run)
        self.writer = SummaryWriter(log_dir=str(run.out_dir / FOLDER))
        table = "\n".join(f"| {key} | {value!r} |" for key, value in run.params.items())
        self.writer.add_text("config", "| key | value |\n| --- | --- |\n" + table, 0)
        self.writer.add_text("tags", ", ".join(f"{key}: {value}" for key, value in run.tags.items()), 0)
        self.writer.flush()

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a running TensorBoard shows the round now, not at the end

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        self.writer.add_image(name, image, step, dataformats="HWC")
        self.writer.flush()

    def log_artifacts(self, out_dir: Path) -> None:
        report = out_dir / "report.md"
        if report.exists():  # TensorBoard's Text tab renders the report's markdown (its tables too)
            self.writer.add_text("report", report.read_text(encoding="utf-8"))

    def close(self, failed: bool = False) -> None:
        self.writer.close()
