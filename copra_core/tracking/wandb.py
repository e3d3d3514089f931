"""Weights & Biases, offline: the run is written under ``<out-dir>/wandb`` and uploaded later.

Always ``mode="offline"``: the federation never waits on the network, and nothing leaves
the machine until the user runs ``wandb sync <out-dir>/wandb/offline-run-*``. W&B's system
statistics and environment metadata are off (they would sample the server process only and
start a further helper process). ``close`` finishes the run and shuts down W&B's
``wandb-core`` service process, which otherwise outlives the run until the process exits.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import wandb

from copra_core.tracking.base import RunInfo, Tracker

#: W&B rejects tags longer than this.
MAX_TAG_LENGTH = 64


class WandbTracker(Tracker):
    """Config = the flat config, tags ``method:copra`` etc., history step = the server round."""

    name = "wandb"

    def __init__(self, run: RunInfo) -> None:
        super().__init__(run)
        run.out_dir.mkdir(parents=True, exist_ok=True)
        self.wandb_run = wandb.init(
            project=run.wandb_project,
            name=run.name,
            dir=str(run.out_dir),  # W&B adds its own "wandb/" folder below it
            mode="offline",
            config=dict(run.params),
            tags=[f"{key}:{value}"[:MAX_TAG_LENGTH] for key, value in run.tags.items()],
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, x_disable_meta=True),
        )

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.wandb_run.log(dict(scalars), step=step)

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        self.wandb_run.log({name: wandb.Image(image)}, step=step)

    def close(self, failed: bool = False) -> None:
        try:
            self.wandb_run.finish(exit_code=1 if failed else 0)
        finally:
            wandb.teardown()  # ends the wandb-core service process (it is started again by the next init)
