"""constant: every module scores the same (the baseline)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from copra_core.allocation.proxies.base import Proxy, Scores, lora_pairs
from copra_core.tasks.base import Batch, Task


class ConstantProxy(Proxy):
    """Score 1 for every module: ``allocate`` breaks the tie with a seeded permutation, so
    this is a uniformly random allocation under the same budget (the paper's baseline)."""

    name = "constant"
    needs_nonzero_b = False

    def score(self, model: nn.Module, task: Task, batches: Iterable[Batch], device: torch.device) -> Scores:
        del task, batches, device  # data-free
        return dict.fromkeys(lora_pairs(model), 1.0)
