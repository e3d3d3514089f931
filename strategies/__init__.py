"""Aggregation rules for federated LoRA, one per module, and their registry."""

from strategies.base import AdapterState, AggregationRule, ClientUpdate, StrategyContractError
from strategies.registry import BUILTIN, ENTRY_POINT_GROUP, available, build, dry_run, resolve

__all__ = [
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "AdapterState",
    "AggregationRule",
    "ClientUpdate",
    "StrategyContractError",
    "available",
    "build",
    "dry_run",
    "resolve",
]
