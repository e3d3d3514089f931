"""The proxy interface and what the proxies share."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import ClassVar

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from copra_core.lora import ADAPTER_NAME
from copra_core.tasks.base import Batch, Task

Scores = dict[str, float]


def lora_pairs(model: nn.Module) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """Module name -> (A, B) weight parameters of every LoRA layer (names match adapter-state prefixes)."""
    return {
        name: (module.lora_A[ADAPTER_NAME].weight, module.lora_B[ADAPTER_NAME].weight)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


@contextlib.contextmanager
def probe_b(model: nn.Module, std: float, seed: int) -> Iterator[bool]:
    """If every LoRA B is zero (LoRA's initialisation), give B a tiny seeded random value.

    At B = 0 a module's output is zero whatever A, so SNIP, SynFlow and the alpha gate all
    score zero everywhere; they are scored at a tiny random B (docs/methods.md#heterolora). Yields whether
    it probed; the original B is restored exactly afterwards.
    """
    pairs = lora_pairs(model)
    needed = all(not b.detach().any() for _, b in pairs.values())
    saved = {name: b.detach().clone() for name, (_, b) in pairs.items()} if needed else {}
    if needed:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, b in pairs.values():
                b.copy_(std * torch.randn(b.shape, generator=generator).to(b.device, b.dtype))
    try:
        yield needed
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                pairs[name][1].copy_(value)


class Proxy(ABC):
    """A zero-cost proxy: a saliency score per LoRA module, higher = more worth training.

    ``score`` is called with every block active, the model in eval mode (no dropout) and
    must leave the model's weights as it found them.
    """

    name: ClassVar[str] = ""
    #: True if the score is identically zero at B = 0 (scored with ``probe_b`` then).
    needs_nonzero_b: ClassVar[bool] = True

    @abstractmethod
    def score(self, model: nn.Module, task: Task, batches: Iterable[Batch], device: torch.device) -> Scores:
        """Score every LoRA module of ``model`` (keys: module names, as adapter-state prefixes)."""


def backward_over(
    model: nn.Module, task: Task, batches: Iterable[Batch], device: torch.device
) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """For each batch: the task loss's gradients w.r.t. every module's (A, B), then cleared."""
    pairs = lora_pairs(model)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        loss, _ = task.batch_stats(model, batch)
        loss.backward()
        yield {
            name: (
                a.grad if a.grad is not None else torch.zeros_like(a),
                b.grad if b.grad is not None else torch.zeros_like(b),
            )
            for name, (a, b) in pairs.items()
        }
    model.zero_grad(set_to_none=True)
