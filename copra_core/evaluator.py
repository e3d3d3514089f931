"""Server-side evaluation of adapters in factor space and in product space."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from copra_core.adapters import LORA_A, LORA_B, AdapterState, set_adapter_state
from copra_core.copra import all_blocks_active
from copra_core.diagnostics import Deltas
from copra_core.learner import ModelBundle
from copra_core.lora import ADAPTER_NAME
from copra_core.tasks import Batch
from copra_core.training import evaluate


class ServerEvaluator:
    """Evaluates adapter states on a fixed set of examples with the server's model.

    Batches are collated once and reused, so every round and every diagnostic sees
    exactly the same inputs.
    """

    def __init__(self, bundle: ModelBundle, examples: Sequence, batch_size: int) -> None:
        self.bundle = bundle
        self.metric = bundle.task.metric
        self.size = len(examples)
        self._batches: list[Batch] = list(bundle.task.eval_batches(examples, batch_size))
        self._template = bundle.initial_state()

    def _run(self) -> dict[str, float]:
        with all_blocks_active(self.bundle.blocks, self.bundle.base_offsets):
            return evaluate(self.bundle.model, self.bundle.task, self._batches, self.bundle.device)

    def factor(self, state: AdapterState) -> dict[str, float]:
        """Evaluate an adapter given by its factors (what the model computes normally)."""
        set_adapter_state(self.bundle.model, state)
        return self._run()

    def product(self, deltas: Deltas, dense: AdapterState) -> dict[str, float]:
        """Evaluate base + scaling * Delta W per module (LoRA factors zeroed), with ``dense``."""
        state = {k: torch.zeros_like(v) if k.endswith((LORA_A, LORA_B)) else v for k, v in self._template.items()}
        state.update(dense)
        set_adapter_state(self.bundle.model, state)
        with self._merged(deltas):
            return self._run()

    @contextlib.contextmanager
    def _merged(self, deltas: Deltas) -> Iterator[None]:
        """Temporarily add scaling * Delta W to the frozen base weights, restoring them exactly."""
        model = self.bundle.model
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for module_name, delta in deltas.items():
                    layer = model.get_submodule(module_name)
                    weight = layer.get_base_layer().weight
                    saved.append((weight, weight.detach().clone()))
                    scaling = layer.scaling[ADAPTER_NAME]
                    weight.add_(delta.to(weight.device, weight.dtype), alpha=scaling)
            yield
        finally:
            with torch.no_grad():
                for weight, original in saved:
                    weight.copy_(original)
