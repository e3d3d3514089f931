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

    @abstractmethod
    def aggregate(self, updates: Sequence[ClientUpdate], current: Mapping[str, torch.Tensor]) -> AdapterState:
        """Combine ``updates`` into the new global adapter."""


class StrategyContractError(TypeError):
    """A strategy class or its output does not satisfy the aggregation-rule contract."""
