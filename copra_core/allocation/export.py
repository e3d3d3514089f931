"""Export an allocated adapter: only the trained modules, each at its own rank (PEFT ``rank_pattern``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftModel

from copra_core.adapters import LORA_A, LORA_B, dense_keys, lora_modules, write_adapter_folder
from copra_core.lora import ADAPTER_NAME

#: PeftModel's prefix of adapter-state keys; PEFT's target and pattern names are relative to the base.
PEFT_PREFIX = "base_model.model."


def effective_ranks(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Per module, 1 + the index of the last component whose B column is not exactly zero (0: unused).

    Components past it contribute ``B[:, j] A[j] = 0``: dropping them is exact. Modules
    nobody trained still have LoRA's ``B = 0`` and get rank 0.
    """
    ranks = {}
    for module in lora_modules(state):
        used = state[module + LORA_B].abs().sum(dim=0).nonzero()
        ranks[module] = int(used.max()) + 1 if used.numel() else 0
    return ranks


def export_allocated_adapter(model: PeftModel, state: Mapping[str, torch.Tensor], out_dir: Path) -> Path:
    """Write a PEFT adapter folder holding only the modules in use, at their effective ranks.

    ``target_modules`` lists the modules by full name, ``rank_pattern`` gives each module
    whose rank differs from ``r`` its own, and ``alpha_pattern`` keeps its scaling: PEFT
    scales a rank-r_m module by ``alpha_m / r_m``, so ``alpha_m = alpha * r_m / r`` (rsLoRA:
    ``alpha * sqrt(r_m / r)``) reproduces the in-run ``alpha / r`` exactly. The folder loads
    with ``PeftModel.from_pretrained`` and computes what the run's model computed.
    """
    ranks = {m: r for m, r in effective_ranks(state).items() if r > 0}
    if not ranks:
        raise ValueError("no LoRA module holds a trained update (every B is zero): nothing to export")
    config = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    full, alpha = config.r, config.lora_alpha
    names = {m: m.removeprefix(PEFT_PREFIX) for m in ranks}
    config.target_modules = sorted(names.values())
    config.rank_pattern = {names[m]: r for m, r in ranks.items() if r != full}
    config.alpha_pattern = {
        names[m]: alpha * ((r / full) ** 0.5 if config.use_rslora else r / full) for m, r in ranks.items() if r != full
    }
    tensors = {k: state[k] for k in dense_keys(state)}
    for module, rank in ranks.items():
        tensors[module + LORA_A] = state[module + LORA_A][:rank]
        tensors[module + LORA_B] = state[module + LORA_B][:, :rank]
    return write_adapter_folder(out_dir, config, tensors)
