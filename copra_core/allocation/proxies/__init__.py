"""Zero-cost proxies, one per module, chosen by ``allocation.proxy``."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from copra_core.allocation.proxies.alpha_gate import AlphaTestProxy
from copra_core.allocation.proxies.base import Proxy, Scores, lora_pairs, probe_b
from copra_core.allocation.proxies.constant import ConstantProxy
from copra_core.allocation.proxies.grad_norm import GradNormProxy
from copra_core.allocation.proxies.snip import SnipProxy
from copra_core.allocation.proxies.synflow import SynFlowProxy
from copra_core.config import ConfigError
from copra_core.copra import all_blocks_active
from copra_core.tasks.base import Batch, Task

PROXIES: dict[str, type[Proxy]] = {
    p.name: p for p in (GradNormProxy, SnipProxy, SynFlowProxy, ConstantProxy, AlphaTestProxy)
}


def build_proxy(name: str) -> Proxy:
    if name not in PROXIES:
        raise ConfigError(f"Config key 'allocation.proxy': unknown proxy '{name}'; known: {sorted(PROXIES)}")
    return PROXIES[name]()


def score_modules(
    model: nn.Module,
    blocks: Sequence,
    task: Task,
    batches: Sequence[Batch],
    device: torch.device,
    *,
    proxy: str,
    probe_std: float,
    seed: int,
) -> tuple[Scores, bool]:
    """Score every LoRA module with ``proxy``; returns (scores, whether B was probed).

    Every block active, eval mode (no dropout: the score must not depend on a dropout
    draw), the model's weights and training mode restored afterwards.
    """
    scorer = build_proxy(proxy)
    was_training = model.training
    model.eval()
    try:
        with all_blocks_active(blocks), contextlib.ExitStack() as stack:
            probed = scorer.needs_nonzero_b and stack.enter_context(probe_b(model, probe_std, seed))
            scores = scorer.score(model, task, batches, device)
    finally:
        model.train(was_training)
    return scores, bool(probed)


__all__ = ["PROXIES", "Proxy", "Scores", "build_proxy", "lora_pairs", "probe_b", "score_modules"]
