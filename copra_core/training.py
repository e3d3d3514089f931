"""Local training (one client, one round) and evaluation loops."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from copra_core.copra import BlockDropper, global_progress
from copra_core.tasks.base import Batch, Task


def lr_factor(schedule: str, progress: float) -> float:
    """Multiplier of the base learning rate at global progress in [0, 1].

    Driven by global progress like CopRA's schedule, so decay spans the whole run
    rather than restarting in every round's fresh optimizer.
    """
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"Config key 'train.lr-schedule': unknown schedule '{schedule}'")


@dataclass
class RoundSchedule:
    """Where this local call sits in the whole federated run (sent by the server)."""

    server_round: int
    num_rounds: int
    local_steps: int

    def progress(self, step: int) -> float:
        return global_progress(self.server_round, step, self.num_rounds, self.local_steps)


def train_local(
    model: nn.Module,
    task: Task,
    batches: Iterable[Batch],
    *,
    schedule: RoundSchedule,
    dropper: BlockDropper,
    lr: float,
    weight_decay: float,
    lr_schedule: str = "constant",
    head_lr: float = 0.0,
    freeze_a: bool = False,
    device: torch.device,
) -> dict[str, float]:
    """Run ``schedule.local_steps`` AdamW steps with one CopRA block mask per step.

    A fresh optimizer per round, as in FedAvg: optimizer state is local and is not
    federated. ``freeze_a`` leaves every LoRA A untouched (FFA-LoRA): no gradient, no
    optimizer state, no weight decay.
    """
    with _lora_a_frozen(model, freeze_a):
        lora_params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
        other_params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
        groups = [{"params": lora_params, "base_lr": lr}]
        if other_params:
            groups.append({"params": other_params, "base_lr": head_lr or lr})
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        model.train()
        loss_sum, active_sum, p_first, p_last, steps = 0.0, 0.0, 0.0, 0.0, 0
        try:
            for step, batch in enumerate(batches):
                progress = schedule.progress(step)
                p, mask = dropper.step(progress)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * lr_factor(lr_schedule, progress)
                p_first = p if step == 0 else p_first
                p_last = p
                batch = {k: v.to(device) for k, v in batch.items()}
                loss, _ = task.batch_stats(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach())
                active_sum += float(mask.float().mean())
                steps += 1
        finally:
            dropper.step_all_active()
        if steps == 0:
            raise ValueError("No training batches: the client's partition is empty.")
        return {
            "train_loss": loss_sum / steps,
            "active_fraction": active_sum / steps,
            "p_start": p_first,
            "p_end": p_last,
            "steps": float(steps),
        }


@contextlib.contextmanager
def _lora_a_frozen(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Switch off gradients of every LoRA A for the block (FFA-LoRA), restoring them after."""
    with frozen([p for n, p in model.named_parameters() if enabled and p.requires_grad and "lora_A" in n]):
        yield


@contextlib.contextmanager
def frozen(params: list[nn.Parameter]) -> Iterator[None]:
    """Switch off ``requires_grad`` of ``params`` for the block, switching it back on after."""
    for param in params:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in params:
            param.requires_grad_(True)


@torch.no_grad()
def evaluation_sums(model: nn.Module, task: Task, batches: Iterable[Batch], device: torch.device) -> dict[str, float]:
    """The task's additive statistics over ``batches`` (all blocks active: callers ensure it).

    Additive, so the sums of several clients pool exactly (``task.summarise`` of their total).
    """
    model.eval()
    sums: dict[str, float] = {}
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        _, stats = task.batch_stats(model, batch)
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value
    return sums


def evaluate(model: nn.Module, task: Task, batches: Iterable[Batch], device: torch.device) -> dict[str, float]:
    """Loss and the task metric over ``batches`` (all blocks active: callers ensure it)."""
    return task.summarise(evaluation_sums(model, task, batches, device))
