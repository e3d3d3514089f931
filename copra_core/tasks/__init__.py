"""Task registry: config key ``task`` -> Task class."""

from __future__ import annotations

from copra_core.config import ConfigError, RunConfig
from copra_core.tasks.base import Batch, Task
from copra_core.tasks.causal_lm import CausalLMTask
from copra_core.tasks.sequence_classification import SequenceClassificationTask

TASKS: dict[str, type[Task]] = {
    SequenceClassificationTask.name: SequenceClassificationTask,
    CausalLMTask.name: CausalLMTask,
}


def build_task(config: RunConfig) -> Task:
    if config.task not in TASKS:
        raise ConfigError(f"Config key 'task': unknown task '{config.task}'; known: {sorted(TASKS)}")
    return TASKS[config.task](config)


__all__ = ["TASKS", "Batch", "Task", "build_task"]
