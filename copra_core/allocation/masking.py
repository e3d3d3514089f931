"""The client side of an allocation: which modules a client trains, at which rank, and its reply.

A client's rank ``r_k <= r`` is realised by zeroing components ``r_k..r-1`` of every LoRA
pair before training: with ``A[j] = 0`` and ``B[:, j] = 0`` both gradients of component j
are zero (``dL/dB[:, j]`` is proportional to ``A[j] x`` and ``dL/dA[j]`` to ``B[:, j]``), and
AdamW's decoupled weight decay keeps zero at zero, so the client trains exactly a rank-r_k
adapter: the global adapter truncated to its first r_k components, as in heterogeneous-rank
federated LoRA (FlexLoRA, HeteroLoRA of Cho et al.). Compute and traffic follow r_k; the
memory of the cached rank-r model does not shrink (building one model per rank would).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from copra_core import protocol
from copra_core.adapters import LORA_A, LORA_B, AdapterMismatchError, AdapterState, dense_keys, lora_modules
from copra_core.config import ConfigError
from copra_core.lora import ADAPTER_NAME
from copra_core.training import frozen


@dataclass(frozen=True)
class ClientPlan:
    """What one client trains this round."""

    modules: tuple[str, ...]
    rank: int


def client_plan(
    modules: Sequence[str], ranking: Sequence[str], node_config: Mapping[str, object], full_rank: int
) -> ClientPlan:
    """The server's allocation, narrowed or widened by this node's own budget and rank."""
    chosen = tuple(modules)
    if protocol.NODE_BUDGET in node_config:
        fraction = float(node_config[protocol.NODE_BUDGET])  # type: ignore[arg-type]
        if not 0 < fraction <= 1:
            raise ConfigError(f"Node config key '{protocol.NODE_BUDGET}' must be in (0, 1], got {fraction}.")
        chosen = tuple(ranking[: max(1, int(fraction * len(ranking) + 1e-9))])
    rank = full_rank
    if protocol.NODE_RANK in node_config:
        rank = int(node_config[protocol.NODE_RANK])  # type: ignore[arg-type]
        if not 0 < rank <= full_rank:
            raise ConfigError(f"Node config key '{protocol.NODE_RANK}' must be in [1, lora.r={full_rank}], got {rank}.")
    return ClientPlan(modules=chosen, rank=rank)


def truncate(state: Mapping[str, torch.Tensor], rank: int) -> AdapterState:
    """``state`` with components ``rank..`` of every LoRA pair set to zero (a rank-``rank`` view)."""
    out = {k: v.clone() for k, v in state.items()}
    for module in lora_modules(state):
        out[module + LORA_A][rank:] = 0.0
        out[module + LORA_B][:, rank:] = 0.0
    return out


@contextlib.contextmanager
def restricted_training(model: nn.Module, plan: ClientPlan) -> Iterator[None]:
    """Only ``plan.modules``' LoRA factors train; every pair is truncated to ``plan.rank``.

    Gradients of the other modules' factors are switched off for the block and restored
    afterwards.
    """
    enabled = set(plan.modules)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    unknown = sorted(enabled - set(layers))
    if unknown:
        raise AdapterMismatchError(f"allocation names modules the model has no LoRA on: {unknown[:3]}")
    to_freeze: list[nn.Parameter] = []
    with torch.no_grad():
        for name, layer in layers.items():
            a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
            a[plan.rank :] = 0.0
            b[:, plan.rank :] = 0.0
            if name not in enabled:
                to_freeze += [p for p in (a, b) if p.requires_grad]
    with frozen(to_freeze):
        yield


def partial_state(state: Mapping[str, torch.Tensor], plan: ClientPlan) -> AdapterState:
    """The reply: the trained modules' first ``plan.rank`` components, plus every dense tensor."""
    out = {k: state[k] for k in dense_keys(state)}
    for module in plan.modules:
        out[module + LORA_A] = state[module + LORA_A][: plan.rank].clone()
        out[module + LORA_B] = state[module + LORA_B][:, : plan.rank].clone()
    return out


def reply_rank(state: Mapping[str, torch.Tensor]) -> int:
    """The rank of a partial reply (0 when it carries no LoRA module)."""
    modules = lora_modules(state)
    return state[modules[0] + LORA_A].shape[0] if modules else 0


def check_partial(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], *, source: str) -> None:
    """A partial reply must hold every dense tensor, whole A/B pairs of known modules, one rank <= r."""
    problems = []
    missing_dense = sorted(set(dense_keys(reference)) - set(state))
    unexpected = sorted(set(state) - set(reference))
    if missing_dense:
        problems.append(f"missing keys {missing_dense[:5]}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}")
    for key in dense_keys(state):
        if key in reference and tuple(state[key].shape) != tuple(reference[key].shape):
            problems.append(f"shape mismatch {key}: {tuple(state[key].shape)} != {tuple(reference[key].shape)}")
    ranks = set()
    for module in lora_modules(state):
        if module + LORA_B not in state:
            problems.append(f"{module}: lora_A without lora_B")
            continue
        a, b = state[module + LORA_A], state[module + LORA_B]
        ref_a, ref_b = reference.get(module + LORA_A), reference.get(module + LORA_B)
        if ref_a is None or ref_b is None:
            continue  # reported as unexpected above
        if a.shape[1] != ref_a.shape[1] or b.shape[0] != ref_b.shape[0] or a.shape[0] != b.shape[1]:
            problems.append(f"{module}: shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit {tuple(ref_a.shape)}")
        elif not 0 < a.shape[0] <= ref_a.shape[0]:
            problems.append(f"{module}: rank {a.shape[0]} outside [1, {ref_a.shape[0]}]")
        ranks.add(a.shape[0])
    orphans = [k[: -len(LORA_B)] for k in state if k.endswith(LORA_B) and k[: -len(LORA_B)] + LORA_A not in state]
    if orphans:
        problems.append(f"lora_B without lora_A for {orphans[:3]}")
    if len(ranks) > 1:
        problems.append(f"modules at different ranks {sorted(ranks)}")
    if problems:
        raise AdapterMismatchError(f"{source} does not fit the global adapter: " + "; ".join(problems))


def effective_state(partial: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> AdapterState:
    """The whole adapter the client's model held after training (for diagnostics).

    The global adapter truncated to the reply's rank, with the trained modules and the dense
    tensors replaced: exactly what ``restricted_training`` left in the client's model.
    """
    rank = reply_rank(partial) or reply_rank(current)
    out = truncate(current, rank)
    for key, value in partial.items():
        if key.endswith(LORA_A):
            out[key][: value.shape[0]] = value
        elif key.endswith(LORA_B):
            out[key][:, : value.shape[1]] = value
        else:
            out[key] = value.clone()
    return out
