"""LoRA wiring with PEFT: build the adapted model and find its transformer blocks."""

from __future__ import annotations

import logging
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from copra_core.config import ConfigError, LoraSettings, split_csv

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"


def adaptable_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers LoRA can target (e.g. 'query', 'dense')."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    return sorted(names)


def build_peft_model(base: nn.Module, settings: LoraSettings, new_modules: list[str], seed: int) -> PeftModel:
    """Wrap ``base`` with LoRA on ``settings.target_modules``.

    ``auto`` in ``modules_to_save`` stands for the modules the checkpoint did not
    contain (a fresh classification head): they are trained and federated with the
    adapter, otherwise every process would hold a different random head.
    """
    targets = split_csv(settings.target_modules)
    if settings.shortcuts:
        from copra_core.shortcuts import SHORTCUT, add_shortcuts  # it needs find_block_list from here

        add_shortcuts(base)
        targets.append(SHORTCUT)
    module_names = [name for name, _ in base.named_modules()]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in module_names):
            raise ConfigError(
                f"Config key 'lora.target-modules': module '{target}' not found in the model; "
                f"linear layers are: {adaptable_module_names(base)}"
            )
    to_save: list[str] = []
    for name in split_csv(settings.modules_to_save):
        if name == "auto":
            to_save.extend(m for m in new_modules if m not in to_save)
            continue
        if not any(n == name or n.endswith("." + name) for n in module_names):
            raise ConfigError(f"Config key 'lora.modules-to-save': module '{name}' not found in the model.")
        to_save.append(name)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=to_save or None,
        use_rslora=settings.use_rslora,
        bias="none",
    )
    # LoRA A is randomly initialised: seed it so the server's initial adapter is reproducible.
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # transformers 5 deprecates an attribute PEFT still reads; nothing for users to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(base, config, adapter_name=ADAPTER_NAME)


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks (CopRA's players).

    Found structurally, not by architecture-specific names: the ``nn.ModuleList`` of
    identically-typed children holding the most parameters (``bert.encoder.layer``,
    ``model.layers``, ``transformer.h``, ...).
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ValueError("No list of transformer blocks (nn.ModuleList of identical layers) found in the model.")
    return best[1], best[2]


def lora_layers_by_block(model: nn.Module) -> list[list[LoraLayer]]:
    """LoRA layers grouped by the transformer block that contains them."""
    prefix, blocks = find_block_list(model)
    grouped: list[list[LoraLayer]] = [[] for _ in blocks]
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not name.startswith(prefix + "."):
            continue  # LoRA outside the blocks (rare): never dropped
        index = int(name[len(prefix) + 1 :].split(".", 1)[0])
        grouped[index].append(module)
    return grouped
