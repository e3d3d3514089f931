"""SynFlow: data-free synaptic flow through |theta| on an all-ones input."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from copra_core.allocation.proxies.base import Proxy, Scores, lora_pairs
from copra_core.tasks.base import Batch, Task


class SynFlowProxy(Proxy):
    """Tanaka et al. 2020, https://arxiv.org/abs/2006.05467.

    Every weight is replaced by its absolute value, an all-ones embedding sequence (of the
    first batch's length) is fed through, ``R = sum(logits)`` is back-propagated and a module
    scores ``sum |theta * dR/dtheta|`` over its A and B. The signs are restored exactly
    afterwards (``|w| * sign(w) == w`` in floating point). Zero at B = 0 like SNIP: scored
    with a tiny random B (``probe_b``). The data only supplies the sequence length.
    """

    name = "synflow"

    def score(self, model: nn.Module, task: Task, batches: Iterable[Batch], device: torch.device) -> Scores:
        del task
        first = next(iter(batches))
        length = int(first["input_ids"].shape[1])
        params = list(model.parameters())
        with torch.no_grad():
            signs = [p.sign() for p in params]
            for p in params:
                p.abs_()
        try:
            embeddings = model.get_input_embeddings()
            ones = torch.ones(1, length, embeddings.embedding_dim, device=device, dtype=embeddings.weight.dtype)
            mask = torch.ones(1, length, dtype=torch.long, device=device)
            model.zero_grad(set_to_none=True)
            output = model(inputs_embeds=ones, attention_mask=mask)
            output.logits.double().sum().backward()
            scores: Scores = {}
            for name, (a, b) in lora_pairs(model).items():
                terms = [(p.detach() * p.grad).abs().sum() for p in (a, b) if p.grad is not None]
                scores[name] = float(sum(terms)) if terms else 0.0
            return scores
        finally:
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, sign in zip(params, signs, strict=True):
                    p.mul_(sign)
