"""Full-weight gradient estimate of every LoRA base layer, one weight's gradient at a time.

LoRA-GA needs ``G = mean over batches of dL/dW0`` for each adapted weight. Autograd
would keep every ``W0.grad`` alive until the optimizer step; here a post-accumulate
hook moves each weight's gradient into its running sum the moment autograd has
produced it and frees it, so during a backward pass at most one full-weight gradient
exists besides the sums (as the LoRA-GA authors' hook-based code does). With
``accumulate_on="cpu"`` the sums live in host memory and the accelerator only ever
holds that one gradient.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from copra_core.tasks import Batch, Task


def lora_base_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Module name (as in adapter keys, without ``.lora_A.weight``) -> the LoRA layer's base layer."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if getattr(module, "fan_in_fan_out", False):
            # GPT-2's Conv1D stores W transposed; base offsets are d_out x d_in. Refuse rather
            # than silently build transposed factors.
            raise ValueError(f"LoRA-GA: '{name}' stores its weight transposed (fan_in_fan_out); not supported")
        layers[name] = module.get_base_layer()
    return layers


def estimate_weight_gradients(
    model: nn.Module,
    task: Task,
    batches: Iterable[Batch],
    device: torch.device,
    accumulate_on: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], int]:
    """Mean gradient of the task loss w.r.t. every LoRA base weight; returns (gradients, batches).

    Only the base weights require grad during the estimate (the adapter, the head and the
    rest of the model do not), and every parameter's ``requires_grad`` is restored after.
    The model is in training mode (dropout on), as in the first steps it prepares for.
    """
    layers = lora_base_layers(model)
    if not layers:
        raise ValueError("estimate_weight_gradients: the model has no LoRA layers")
    sums = {
        name: torch.zeros(layer.weight.shape, dtype=torch.float32, device=accumulate_on)
        for name, layer in layers.items()
    }
    saved = {param: param.requires_grad for param in model.parameters()}
    hooks = []

    def collect(name: str):
        def hook(param: torch.Tensor) -> None:
            sums[name].add_(param.grad.detach().to(sums[name].device, torch.float32))
            param.grad = None  # freed now, not at the end of the backward pass

        return hook

    was_training = model.training
    count = 0
    try:
        for param in model.parameters():
            param.requires_grad_(False)
        for name, layer in layers.items():
            layer.weight.requires_grad_(True)
            hooks.append(layer.weight.register_post_accumulate_grad_hook(collect(name)))
        model.train()
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            loss, _ = task.batch_stats(model, batch)
            loss.backward()
            count += 1
    finally:
        for hook in hooks:
            hook.remove()
        for param, requires_grad in saved.items():
            param.requires_grad_(requires_grad)
            param.grad = None
        model.train(was_training)
    if count == 0:
        raise ValueError("estimate_weight_gradients: no calibration batches (config key 'init.calibration-batches')")
    return {name: total / count for name, total in sums.items()}, count
