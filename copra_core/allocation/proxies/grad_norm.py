"""grad-norm: ``||dL/dA||_F + ||dL/dB||_F`` per module, averaged over batches."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from copra_core.allocation.proxies.base import Proxy, Scores, backward_over
from copra_core.tasks.base import Batch, Task


class GradNormProxy(Proxy):
    """Gradient norm of the LoRA factors (Abdelfattah et al. 2021, https://arxiv.org/abs/2101.08134).

    Well defined at B = 0: dL/dA vanishes there but dL/dB does not, so no probe is needed.
    """

    name = "grad_norm"
    needs_nonzero_b = False

    def score(self, model: nn.Module, task: Task, batches: Iterable[Batch], device: torch.device) -> Scores:
        sums: Scores = {}
        count = 0
        for grads in backward_over(model, task, batches, device):
            for name, (ga, gb) in grads.items():
                sums[name] = sums.get(name, 0.0) + float(ga.norm()) + float(gb.norm())
            count += 1
        return {name: value / max(count, 1) for name, value in sums.items()}
