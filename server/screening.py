"""Screening of train replies: leave out the odd ones instead of stopping the run.

Each reply is decoded on its own and checked (``copra_core/screening.py``: records, keys,
shapes, dtype, finite values, example count), then the update norms of the replies that
passed are compared with each other. A failing reply is logged with its node, partition
and reason and left out (``clients/rejected``, ``clients/rejections``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from flwr.app import Message

from copra_core import protocol
from copra_core.adapters import AdapterState, from_array_record
from copra_core.config import ScreeningSettings
from copra_core.screening import check_update, norm_outliers, update_norm

log = logging.getLogger(__name__)


class ReplyScreen:
    """Checks every train reply against the global adapter; see the module docstring.

    Parameters
    ----------
    settings : ScreeningSettings
        Limits (``screening.*``).
    transport_dtype : str
        The dtype replies must arrive in.
    partial : bool
        The rule accepts replies with a subset of the modules at a lower rank.
    """

    def __init__(self, settings: ScreeningSettings, transport_dtype: str, partial: bool) -> None:
        self.settings = settings
        self.transport_dtype = transport_dtype
        self.partial = partial

    def __call__(
        self, server_round: int, replies: list[Message], current: Mapping[str, torch.Tensor]
    ) -> tuple[list[Message], dict]:
        """(the replies that pass, in their order; ``clients/rejected`` metrics)."""
        reasons: dict[int, str] = {}
        norms: dict[int, float] = {}
        for index, msg in enumerate(replies):
            reason, state = self._check(msg, current)
            if reason is None:
                norms[index] = update_norm(state, current)
            else:
                reasons[index] = reason
        reasons.update(norm_outliers(norms, self.settings.max_norm_ratio))
        rejected = []
        for index, reason in sorted(reasons.items()):
            msg = replies[index]
            partition = msg.content.metric_records.get(protocol.METRICS, {}).get(protocol.PARTITION_ID, -1)
            log.warning(
                "round %s: rejected the reply of node %s (partition %s): %s",
                server_round,
                msg.metadata.src_node_id,
                partition,
                reason,
            )
            rejected.append({"node-id": msg.metadata.src_node_id, protocol.PARTITION_ID: partition, "reason": reason})
        metrics: dict = {"clients/rejected": len(rejected)}
        if rejected:
            metrics["clients/rejections"] = rejected
        return [msg for index, msg in enumerate(replies) if index not in reasons], metrics

    def _check(self, msg: Message, current: Mapping[str, torch.Tensor]) -> tuple[str | None, AdapterState]:
        """(why one reply is unusable or None, its adapter). One reply decoded at a time."""
        arrays, metric_records = msg.content.array_records, msg.content.metric_records
        if list(arrays) != [protocol.ARRAYS] or list(metric_records) != [protocol.METRICS]:
            reason = f"expected records '{protocol.ARRAYS}' and '{protocol.METRICS}', "
            return reason + f"got {list(arrays)} and {list(metric_records)}", {}
        record = arrays[protocol.ARRAYS]
        state = from_array_record(record)
        reason = check_update(
            state,
            current,
            {k: a.dtype for k, a in record.items()},
            self.transport_dtype,
            metric_records[protocol.METRICS].get(protocol.NUM_EXAMPLES),
            self.settings.max_num_examples,
            partial=self.partial,
        )
        return reason, state
