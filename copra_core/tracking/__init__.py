"""Experiment tracking: every round of a run in TensorBoard, MLflow or Weights & Biases (offline).

``open_trackers(config, out_dir)`` opens the backends ``tracking.backends`` names and returns
one ``Trackers`` object: pass it as a round observer (``on_round(row)``), call ``on_end(out_dir)``
after the report and adapter are written and ``close()`` at the end. docs/tracking.md has the
details; the libraries come with the ``copra-fl[tracking]`` extra.
"""

from copra_core.tracking.base import EXTRA, RunInfo, Tracker, TrackingWarning, curves_image, round_scalars
from copra_core.tracking.registry import BUILTIN, Trackers, check_backends, open_trackers, resolve, run_tags

__all__ = [
    "BUILTIN",
    "EXTRA",
    "RunInfo",
    "Tracker",
    "Trackers",
    "TrackingWarning",
    "check_backends",
    "curves_image",
    "open_trackers",
    "resolve",
    "round_scalars",
    "run_tags",
]
