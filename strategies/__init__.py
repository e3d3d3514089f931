"""Aggregation rules for federated LoRA, one per module, and their registry."""

from strategies.base import AdapterState, AggregationRule, ClientUpdate, StrategyContractError
from strategies.linear import LinearAveraging
from strategies.product_svd import ProductSVD
from strategies.registry import BUILTIN, build, dry_run, resolve

__all__ = [
    "BUILTIN",
    "AdapterState",
    "AggregationRule",
    "ClientUpdate",
    "LinearAveraging",
    "ProductSVD",
    "StrategyContractError",
    "build",
    "dry_run",
    "resolve",
]
