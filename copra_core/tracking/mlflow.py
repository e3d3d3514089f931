"""MLflow: a run in a local store under ``<out-dir>/mlflow`` or in ``tracking.mlflow-uri``.

The default store is MLflow's SQLite backend (``<out-dir>/mlflow/mlflow.db``, artifacts in
``<out-dir>/mlflow/artifacts``): since MLflow 3.x the plain-folder ``./mlruns`` store is in
maintenance mode and refused unless ``MLFLOW_ALLOW_FILE_STORE`` is set, and the SQLite
backend's own dependencies (SQLAlchemy, alembic) come with Flower already. Any URI MLflow
accepts works in ``tracking.mlflow-uri`` (``http://host:5000``, ``sqlite:///runs/mlflow.db``
shared by several runs, ``databricks``). Everything goes through ``MlflowClient`` with an
explicit run id, never MLflow's process-global active run, so several runs in one process
(``simulate_many``) do not mix.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from copra_core.tracking.base import RunInfo, Tracker

#: Experiment every run is filed under (one store can then hold many runs to compare).
EXPERIMENT = "copra-fl"
#: Folder under the run's out-dir holding the default store.
FOLDER = "mlflow"
#: MLflow's per-request limits of ``log_batch`` (params and metrics).
MAX_PARAMS, MAX_METRICS = 100, 1000
#: Top-level files of a finished run stored as artifacts, next to ``adapter/``.
ARTIFACT_PATTERNS = ("*.md", "*.png", "*.json", "*.jsonl", "base_offset.safetensors")


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class MlflowTracker(Tracker):
    """Run parameters = the flat config, tags = method/strategy/task/dataset, metrics per round."""

    name = "mlflow"

    def __init__(self, run: RunInfo) -> None:
        super().__init__(run)
        artifact_location = None
        uri = run.mlflow_uri
        if not uri:
            folder = (run.out_dir / FOLDER).resolve()
            folder.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{folder / 'mlflow.db'}"
            artifact_location = (folder / "artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(EXPERIMENT, artifact_location=artifact_location)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run.name, tags=dict(run.tags)).info.run_id
        params = [Param(key, str(value)) for key, value in run.params.items()]
        for chunk in _chunks(params, MAX_PARAMS):
            self.client.log_batch(self.run_id, params=chunk, synchronous=True)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        now_ms = int(time.time() * 1000)
        metrics = [Metric(key, value, now_ms, step) for key, value in scalars.items()]
        for chunk in _chunks(metrics, MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        self.client.log_image(self.run_id, image, artifact_file=f"{name}_round_{step:03d}.png")

    def log_artifacts(self, out_dir: Path) -> None:
        # Files at the artifact root, as in out-dir, so report.md's links to its plots still resolve.
        for pattern in ARTIFACT_PATTERNS:
            for path in sorted(out_dir.glob(pattern)):
                self.client.log_artifact(self.run_id, str(path))
        if (out_dir / "adapter").is_dir():
            self.client.log_artifacts(self.run_id, str(out_dir / "adapter"), artifact_path="adapter")

    def close(self, failed: bool = False) -> None:
        status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
        self.client.set_terminated(self.run_id, status=status)
