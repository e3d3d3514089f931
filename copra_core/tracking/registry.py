"""Tracking backends by name, and the object the server feeds: ``open_trackers(config) -> Trackers``.

``tracking.backends`` is a comma list. Each entry is a built-in name (``BUILTIN``: one module
per backend in this package, imported only when asked for, so the libraries stay optional)
or a dotted path ``package.module:Class`` to a ``Tracker`` subclass (importable from the
server process), as ``strategy.name`` accepts for aggregation rules.

A backend the user asked for but cannot have (unknown name, library not installed) is a
``ConfigError`` before round 1. A backend that fails once the federation runs (disk full, an
unreachable MLflow server) is the opposite case: tracking is an observer of the run, so its
failure is one ``TrackingWarning`` and that backend's silence for the rest of the run, never
an exception into the federation and never a changed result.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from copra_core.config import ConfigError, RunConfig, split_csv
from copra_core.tracking.base import EXTRA, KEY, RunInfo, Tracker, TrackingWarning, curves_image, round_scalars

#: Built-in backends: name -> (library it needs, "module:Class").
BUILTIN: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "copra_core.tracking.tensorboard:TensorBoardTracker"),
    "mlflow": ("mlflow", "copra_core.tracking.mlflow:MlflowTracker"),
    "wandb": ("wandb", "copra_core.tracking.wandb:WandbTracker"),
}


def resolve(spec: str) -> type[Tracker]:
    """A built-in name or ``package.module:Class`` -> the backend's class; ConfigError otherwise."""
    if ":" not in spec and spec not in BUILTIN:
        close = difflib.get_close_matches(spec, list(BUILTIN), n=2)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(
            f"Config key '{KEY}': unknown backend '{spec}'. Known: {', '.join(BUILTIN)}; "
            f"or give 'package.module:Class'.{hint}"
        )
    if spec in BUILTIN:
        library, path = BUILTIN[spec]
        try:
            importlib.import_module(library)
        except ImportError as err:
            raise ConfigError(
                f"Config key '{KEY}': backend '{spec}' needs the '{library}' package, which cannot be imported "
                f"({err}). Install the tracking extra: pip install '{EXTRA}' (in a checkout: pip install -e "
                f"'.[tracking]'), or remove '{spec}' from {KEY}."
            ) from err
    else:
        path = spec
    module_name, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"Config key '{KEY}': cannot load backend '{spec}' ({err})") from err
    if not (inspect.isclass(cls) and issubclass(cls, Tracker)) or inspect.isabstract(cls):
        raise ConfigError(
            f"Config key '{KEY}': '{spec}' must be a concrete subclass of copra_core.tracking.Tracker, got {cls!r}"
        )
    return cls


def check_backends(config: RunConfig) -> list[type[Tracker]]:
    """The classes ``tracking.backends`` names, checked (call before starting the federation)."""
    names = split_csv(config.tracking.backends)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"Config key '{KEY}': backend {repeated[0]!r} is listed twice")
    return [resolve(name) for name in names]


def run_tags(config: RunConfig) -> dict[str, str]:
    """The tags every backend puts on the run, to filter and group runs in its UI."""
    return {
        "method": "copra" if config.copra.enabled else "lora",
        "strategy": config.strategy.name,
        "task": config.task,
        "dataset": config.data.dataset,
    }


class Trackers:
    """The backends of one run behind one observer: ``on_round(row)`` per round, ``on_end``, ``close``.

    Usable as a ``server.app.RoundObserver`` (it is callable with the row) and as a context
    manager (``close(failed=True)`` when the block raises). Every call into a backend is
    guarded: its first exception becomes one ``TrackingWarning`` naming the backend, the
    backend is closed (quietly) and not called again; the others go on.
    """

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.live: list[Tracker] = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.live)

    def __call__(self, row: dict) -> None:
        self.on_round(row)

    def on_round(self, row: dict) -> None:
        """Log one metrics row (the server calls this as each round ends, after metrics.jsonl is written)."""
        if not self.live:
            return
        step = int(row["round"])
        scalars = round_scalars(row)
        for tracker in list(self.live):
            self._guarded(tracker, "log_scalars", tracker.log_scalars, step, scalars)
        if row.get("curves") and self.live:
            try:
                image = curves_image(row)
            except Exception as err:  # a figure that cannot be drawn is worth a warning, not the run
                warnings.warn(f"tracking: the round's curves figure failed ({err!r})", TrackingWarning, stacklevel=2)
                image = None
            for tracker in list(self.live) if image is not None else ():
                self._guarded(tracker, "log_image", tracker.log_image, step, "curves/interpolation", image)

    def on_end(self, out_dir: Path) -> None:
        """Store the finished run's files (report.md, plots, config, metrics, adapter/) where a backend keeps files."""
        for tracker in list(self.live):
            self._guarded(tracker, "log_artifacts", tracker.log_artifacts, Path(out_dir))

    def close(self, failed: bool = False) -> None:
        """Finish every backend's run; idempotent."""
        for tracker in list(self.live):
            self._guarded(tracker, "close", tracker.close, failed)
        self.live = []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close(failed=kind is not None)

    def _guarded(self, tracker: Tracker, what: str, call: Callable[..., Any], *args: Any) -> None:
        if tracker not in self.live:
            return
        try:
            call(*args)
        except Exception as err:  # any failure of an observer: warn once, never into the federation
            self.live.remove(tracker)
            warnings.warn(
                f"tracking: backend '{tracker.name or type(tracker).__name__}' failed in {what} "
                f"({type(err).__name__}: {err}); it logs nothing more in this run. The federation goes on.",
                TrackingWarning,
                stacklevel=3,
            )
            if what != "close":
                with contextlib.suppress(Exception):  # release its files and processes; already reported
                    tracker.close(failed=True)


def open_trackers(config: RunConfig, out_dir: Path | str | None = None) -> Trackers:
    """Open the backends ``tracking.backends`` names for the run writing to ``out_dir`` (default: out-dir).

    An unknown backend or a missing library is a ConfigError; a backend that fails to open
    (unwritable folder, unreachable URI) is a warning and is left out.
    """
    classes = check_backends(config)
    folder = Path(out_dir if out_dir is not None else config.out_dir)
    run = RunInfo(
        name=folder.name,
        out_dir=folder,
        params=config.to_flat(),
        tags=run_tags(config),
        mlflow_uri=config.tracking.mlflow_uri,
        wandb_project=config.tracking.wandb_project,
    )
    opened: list[Tracker] = []
    for cls in classes:
        try:
            opened.append(cls(run))
        except Exception as err:  # same rule as a failure later in the run
            warnings.warn(
                f"tracking: backend '{cls.name or cls.__name__}' could not open its run ({type(err).__name__}: "
                f"{err}); the federation goes on without it.",
                TrackingWarning,
                stacklevel=2,
            )
    return Trackers(opened)
