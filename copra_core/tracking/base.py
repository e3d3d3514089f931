"""The interface every tracking backend implements, and what the server's rows become for it.

A backend (``tensorboard.py``, ``mlflow.py``, ``wandb.py``) is a small class that turns
three kinds of calls into its library's own: scalars per round, one image per round (the
interpolation curves), and the run's output files at the end. It never sees a metrics row:
``round_scalars`` and ``curves_image`` below decide once, for every backend, which values a
row holds and how they are named, so the three views show the same series under the same keys.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

#: The extra that installs the three libraries (pyproject's [project.optional-dependencies]).
EXTRA = "copra-fl[tracking]"
#: The config key that names the backends (errors name it).
KEY = "tracking.backends"


class TrackingWarning(UserWarning):
    """A backend failed while the federation ran; it logs nothing more in this run."""


@dataclass(frozen=True)
class RunInfo:
    """What a backend needs to open its run: where, under which name, with which config and tags."""

    name: str
    out_dir: Path
    params: Mapping[str, bool | int | float | str]
    tags: Mapping[str, str]
    mlflow_uri: str = ""
    wandb_project: str = "copra-fl"


class Tracker(ABC):
    """One tracking backend for one run: opened by ``__init__``, fed per round, closed once.

    Subclasses set ``name`` (what ``tracking.backends`` calls them) and implement the three
    abstract methods; ``log_artifacts`` is optional (only MLflow stores files). A method may
    raise anything: the caller (``copra_core.tracking.Trackers``) turns the first failure into
    one warning and stops calling that backend, so a backend needs no error handling of its own.
    """

    name: ClassVar[str] = ""

    def __init__(self, run: RunInfo) -> None:
        self.run = run

    @abstractmethod
    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record the round's scalars (``round_scalars``) at ``step`` = the server round."""

    @abstractmethod
    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        """Record an RGB image (height x width x 3, uint8) at ``step``."""

    def log_artifacts(self, out_dir: Path) -> None:  # noqa: B027 (optional: most backends keep no files)
        """Store the finished run's files (report.md, plots, adapter/); called once, after the run."""

    @abstractmethod
    def close(self, failed: bool = False) -> None:
        """Finish the run (``failed``: the federation stopped with an error) and release files and processes."""


def _is_scalar(value: Any) -> bool:
    # numbers.Real covers bool, int, float and numpy's scalars; metrics.jsonl writes NaN/inf as null.
    return isinstance(value, numbers.Real) and math.isfinite(float(value))


def round_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """Every finite scalar of a metrics row under its metrics.jsonl key, and the per-client values.

    ``round`` is the step, not a series. Each entry of ``row["clients"]`` becomes its own series
    ``clients/<partition-id>/<key>`` (e.g. ``clients/3/loss``), so a client can be followed
    across rounds; lists other than ``clients`` (the interpolation ``curves``) are not scalars.
    """
    scalars = {key: float(value) for key, value in row.items() if key != "round" and _is_scalar(value)}
    for client in row.get("clients") or ():
        partition = client.get("partition-id")
        for key, value in client.items():
            if key != "partition-id" and _is_scalar(value):
                scalars[f"clients/{partition}/{key}"] = float(value)
    return scalars


def curves_image(row: Mapping[str, Any]) -> np.ndarray | None:
    """The round's interpolation curves (loss along the line between two clients' adapters) as RGB pixels.

    None when the round measured none (round 0, diagnostics off). Drawn on a bare ``Figure``
    with the Agg canvas, not through pyplot: the server calls this from Flower's thread, and
    pyplot's global figure registry is not thread-safe.
    """
    curves = row.get("curves") or []
    if not curves:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    canvas = FigureCanvasAgg(figure)
    from copra_core.reporting import draw_interpolation_curves

    draw_interpolation_curves(figure.add_subplot(), row)
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
