"""The aggregation-rule contract.

A rule receives the round's accepted client updates and the current global adapter and
returns the new global adapter::

    class MyRule(AggregationRule):
        name = "my_rule"

        def aggregate(self, updates: Sequence[ClientUpdate], current: AdapterState) -> AdapterState:
            ...

* ``updates``: one ``ClientUpdate`` per client that replied this round, already checked
  against the global adapter (same keys and shapes), tensors fp32 on CPU.
* ``current``: the global adapter the clients started from (fp32, CPU). Do not modify it.
* return: a mapping with exactly the keys, shapes and dtypes of ``current``.

Rules may keep state between rounds (server-side optimisers do); the server calls
``aggregate`` once per round. Everything Flower-specific (messages, sampling) stays in
``server/``: a rule is plain tensors in, tensors out, and can be tested as such.

Optional parts of the contract:

* **Options** are the keyword arguments of ``__init__`` (as Flower's strategies take
  theirs). Give each a type hint and a default; the config key ``strategy.options``
  (``"trim-fraction=0.2, seed=3"``) sets them, converted to the hinted type, and an
  unknown or mistyped option is an error naming the key before round 1.
* ``client_overrides``: run-config keys the rule needs on every client (FFA-LoRA freezes
  A with ``lora.freeze-a = true``); the server applies them before round 1.
* ``partial_updates``: the rule aggregates replies that hold only the modules a client
  trained, at its rank (needed by ``allocation.enabled``).
* ``round_metrics()``: figures about the last aggregation (SVD truncation error, number
  of clipped clients), written to each round's metrics under ``strategy/``.
* ``base_offset()``: offsets of the frozen base weights the rule maintains (FedEx-LoRA's
  residual; ``copra_core/base_offset.py``). The server sends them with every message,
  every client applies them, and the diagnostics count them as part of the aggregate.
* ``state_dict()`` / ``load_state_dict()``: a stateful rule (server optimiser moments,
  residual offsets) returns everything it needs to continue as tensors; the server puts
  them in each round's checkpoint and a resumed run loads them, so it continues exactly
  as the uninterrupted run would. A stateless rule keeps the defaults.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from copra_core.adapters import AdapterState


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply: its trained adapter, its example count and its metrics."""

    node_id: int
    state: Mapping[str, torch.Tensor]
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


class AggregationRule(ABC):
    """Base class of aggregation rules (see the module docstring for the contract)."""

    #: Registry name; also shown in reports.
    name: ClassVar[str] = ""
    #: True if ``aggregate`` reads ``updates`` exactly once, in order: the server may then
    #: pass a generator that decodes one client reply at a time (diagnostics off).
    single_pass: ClassVar[bool] = False
    #: True if the rule accepts partial replies: a subset of the LoRA modules, possibly at a
    #: rank below r (HeteroLoRA allocation, ``strategies/masked.py``). The server then checks
    #: replies with ``check_partial`` instead of requiring the global adapter's exact shapes.
    partial_updates: ClassVar[bool] = False
    #: Run-config keys every client must use with this rule (applied by the server).
    client_overrides: ClassVar[Mapping[str, bool | int | float | str]] = {}

    @abstractmethod
    def aggregate(self, updates: Sequence[ClientUpdate], current: Mapping[str, torch.Tensor]) -> AdapterState:
        """Combine ``updates`` into the new global adapter."""

    def round_metrics(self) -> dict[str, float]:
        """Figures about the most recent ``aggregate`` call (reported as ``strategy/<key>``)."""
        return {}

    def base_offset(self) -> Mapping[str, torch.Tensor]:
        """Cumulative base-weight offsets, ``<module>.base_offset`` -> d_out x d_in (none by default)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything this rule carries between rounds, as tensors (for checkpoints)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned (a resumed run)."""
        if state:
            raise StrategyContractError(
                f"strategy {type(self).__name__} keeps no state, but the checkpoint holds {sorted(state)[:3]}"
            )


def example_weights(updates: Sequence[ClientUpdate], rule: str) -> list[float]:
    """``n_k / sum_j n_j``; an error naming the rule when the counts sum to zero."""
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError(f"{rule}: the updates' num-examples sum to zero")
    return [u.num_examples / total for u in updates]


def client_deltas(updates: Sequence[ClientUpdate], current: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """The clients' changes of one tensor, stacked: ``(K, *shape)`` fp32."""
    reference = current[key].to(torch.float32)
    return torch.stack([u.state[key].to(torch.float32) - reference for u in updates])


class StrategyContractError(TypeError):
    """A strategy class or its output does not satisfy the aggregation-rule contract."""
