"""The base offsets every client applies, and the check that every client's base is the server's.

Two kinds are summed (``copra_core/base_offset.py``): the initialisation's (LoRA-GA, fixed
after round 0) and the rule's (residual, new every round). They are part of the base, so
they always travel in fp32, in their own record next to the adapter, encoded once per
change and attached to every message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from flwr.app import ArrayRecord, Message

from copra_core import protocol
from copra_core.adapters import AdapterState, from_array_record, to_array_record
from copra_core.base_offset import module_of


def as_sent(offsets: Mapping[str, torch.Tensor]) -> AdapterState:
    """``offsets`` as the clients receive them (fp32 on the wire)."""
    return from_array_record(to_array_record(offsets, "float32"))


class BaseOffsetBook:
    """The offsets the clients apply now, and their ``base-offset`` record."""

    def __init__(self) -> None:
        self.init: AdapterState = {}
        self.rule: AdapterState = {}
        self._record: ArrayRecord | None = None

    @property
    def all(self) -> AdapterState:
        """Every offset the clients apply (``<module>.init_offset`` and ``<module>.base_offset``)."""
        return {**self.init, **self.rule}

    def set_init(self, offsets: Mapping[str, torch.Tensor]) -> None:
        """The initialisation's offsets (computed once, before round 1), sent from now on."""
        self.init = as_sent(offsets)
        self._encode()

    def set_rule(self, offsets: Mapping[str, torch.Tensor]) -> None:
        """The rule's offsets after a round (or from a checkpoint), sent from now on."""
        self.rule = dict(offsets)
        self._encode()

    def proposed(self, rule_offsets: Mapping[str, torch.Tensor]) -> tuple[AdapterState, AdapterState]:
        """(the rule's new offsets as sent, their change this round keyed by module) before they apply."""
        new = as_sent(rule_offsets)
        change = {module_of(key): value - self.rule.get(key, torch.zeros_like(value)) for key, value in new.items()}
        return new, change

    def records(self) -> dict[str, ArrayRecord]:
        """The record to attach to every message ({} while there are no offsets)."""
        return {protocol.BASE_OFFSET: self._record} if self._record is not None else {}

    def _encode(self) -> None:
        combined = self.all
        self._record = to_array_record(combined, "float32") if combined else None


def check_client_bases(replies: Sequence[Message], server_checksum: Callable[[], int] | None) -> dict:
    """Clients with base offsets report a CRC32 of their base: all must equal the server's.

    Called before a round's new offsets are applied, so the server's model still has the
    base the clients trained on. Returns the ``clients/*`` and ``server/base_crc32`` metrics;
    a differing base is a RuntimeError (training on different bases would go on silently).
    """
    sums = {
        m.metadata.src_node_id: protocol.reply_metrics(m)[protocol.BASE_CRC32]
        for m in replies
        if protocol.BASE_CRC32 in protocol.reply_metrics(m)
    }
    if not sums:
        return {}
    distinct = sorted(set(sums.values()))
    metrics: dict = {"clients/distinct_bases": len(distinct), "clients/base_crc32": distinct}
    if len(distinct) > 1:
        raise RuntimeError(f"clients trained on different base weights (CRC32 per node: {sums})")
    if server_checksum is not None:
        server = server_checksum()
        metrics["server/base_crc32"] = server
        if server not in sums.values():
            raise RuntimeError(f"clients' base weights differ from the server's (CRC32 {server}; clients: {sums})")
    return metrics
