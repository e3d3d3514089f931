"""SNIP: ``sum |theta * dL/dtheta|`` over a module's A and B, averaged over batches."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from copra_core.allocation.proxies.base import Proxy, Scores, backward_over, lora_pairs
from copra_core.tasks.base import Batch, Task


class SnipProxy(Proxy):
    """Connection sensitivity (Lee et al. 2019, https://arxiv.org/abs/1810.02340).

    Zero at B = 0 (the B term is multiplied by B, and dL/dA is proportional to B): the
    caller scores it with a tiny random B (``probe_b``).
    """

    name = "snip"

    def score(self, model: nn.Module, task: Task, batches: Iterable[Batch], device: torch.device) -> Scores:
        pairs = lora_pairs(model)
        sums: Scores = {}
        count = 0
        for grads in backward_over(model, task, batches, device):
            for name, (ga, gb) in grads.items():
                a, b = pairs[name]
                saliency = float((a.detach() * ga).abs().sum()) + float((b.detach() * gb).abs().sum())
                sums[name] = sums.get(name, 0.0) + saliency
            count += 1
        return {name: value / max(count, 1) for name, value in sums.items()}
