"""alpha-test: how far a learnable output gate on each LoRA module moves in a few steps.

(Not named ``alpha_test.py``: Flower's app builder leaves ``*_test.py`` files out of the FAB.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from copra_core.allocation.proxies.base import Proxy, Scores
from copra_core.lora import ADAPTER_NAME
from copra_core.tasks.base import Batch, Task


class AlphaTestProxy(Proxy):
    """A scalar gate ``alpha_m`` (initially 1) multiplies each LoRA module's output; only the
    gates train, by plain SGD for one step per scoring batch; a module scores ``|alpha_m - 1|``.

    The proxy is named "alpha test" without a definition; this is our reading of it
    (a few-step trainability test of each module's scale), documented in
    docs/heterolora.md. SGD rather than Adam because Adam normalises every gate's step to
    about the same size, which would erase the ranking. Like SNIP it is zero at B = 0 and is
    scored with a tiny random B (``probe_b``).
    """

    name = "alpha_test"

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = lr

    def score(self, model: nn.Module, task: Task, batches: Iterable[Batch], device: torch.device) -> Scores:
        layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        gates = {
            name: torch.ones((), device=device, dtype=layer.lora_B[ADAPTER_NAME].weight.dtype, requires_grad=True)
            for name, layer in layers.items()
        }
        handles = [
            layer.lora_B[ADAPTER_NAME].register_forward_hook(lambda _m, _i, out, gate=gates[name]: out * gate)
            for name, layer in layers.items()
        ]
        try:
            names = list(gates)
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                loss, _ = task.batch_stats(model, batch)
                grads = torch.autograd.grad(loss, [gates[n] for n in names], allow_unused=True)
                with torch.no_grad():
                    for name, grad in zip(names, grads, strict=True):
                        if grad is not None:
                            gates[name] -= self.lr * grad
        finally:
            for handle in handles:
                handle.remove()
        return {name: float((gate.detach() - 1.0).abs()) for name, gate in gates.items()}
