"""Resolve a strategy name or ``package.module:Class`` path to a checked rule instance."""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
from collections.abc import Mapping

import torch

from strategies.base import AggregationRule, ClientUpdate, StrategyContractError
from strategies.linear import LinearAveraging
from strategies.product_svd import ProductSVD

BUILTIN: dict[str, type[AggregationRule]] = {rule.name: rule for rule in (LinearAveraging, ProductSVD)}


def resolve(spec: str) -> type[AggregationRule]:
    """A registry name (``linear``) or a dotted path (``package.module:Class``) -> class."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise StrategyContractError(
                f"Config key 'strategy.name': cannot import module '{module_name}' ({err})"
            ) from err
        if not hasattr(module, attr):
            raise StrategyContractError(f"Config key 'strategy.name': module '{module_name}' has no '{attr}'")
        cls = getattr(module, attr)
    elif spec in BUILTIN:
        cls = BUILTIN[spec]
    else:
        close = difflib.get_close_matches(spec, list(BUILTIN), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise StrategyContractError(
            f"Config key 'strategy.name': unknown strategy '{spec}'. Known: {sorted(BUILTIN)}; "
            f"or give 'package.module:Class'.{hint}"
        )
    check_class(cls, spec)
    return cls


def check_class(cls: object, spec: str) -> None:
    if not inspect.isclass(cls):
        raise StrategyContractError(f"Strategy '{spec}' is not a class: {cls!r}")
    if not issubclass(cls, AggregationRule):
        raise StrategyContractError(
            f"Strategy '{spec}' ({cls.__module__}.{cls.__qualname__}) must subclass strategies.base.AggregationRule"
        )
    if inspect.isabstract(cls):
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        raise StrategyContractError(f"Strategy '{spec}' does not implement {missing}")


def build(spec: str) -> AggregationRule:
    try:
        return resolve(spec)()
    except TypeError as err:
        if isinstance(err, StrategyContractError):
            raise
        raise StrategyContractError(f"Strategy '{spec}' cannot be constructed without arguments: {err}") from err


def dry_run(rule: AggregationRule, template: Mapping[str, torch.Tensor]) -> None:
    """Check the rule's output contract before round 1, on a copy of the rule.

    Two synthetic clients holding perturbed copies of the initial adapter; the output
    must have the template's keys, shapes and dtypes and be finite.
    """
    generator = torch.Generator().manual_seed(0)
    updates = [
        ClientUpdate(
            node_id=i,
            state={k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in template.items()},
            num_examples=10 * (i + 1),
        )
        for i in range(2)
    ]
    name = type(rule).__qualname__
    try:
        out = copy.deepcopy(rule).aggregate(updates, dict(template))
    except Exception as err:  # any failure here means the rule breaks the contract
        raise StrategyContractError(f"Strategy {name} failed on a dry run before round 1: {err!r}") from err
    if not isinstance(out, Mapping):
        raise StrategyContractError(f"Strategy {name} returned {type(out).__name__}, not a mapping of tensors")
    if set(out) != set(template):
        missing, extra = sorted(set(template) - set(out)), sorted(set(out) - set(template))
        raise StrategyContractError(f"Strategy {name} output keys differ: missing {missing[:3]}, extra {extra[:3]}")
    for key, ref in template.items():
        value = out[key]
        if not isinstance(value, torch.Tensor) or value.shape != ref.shape or value.dtype != ref.dtype:
            got = (type(value).__name__, getattr(value, "shape", None), getattr(value, "dtype", None))
            raise StrategyContractError(
                f"Strategy {name} output '{key}' is {got}, expected tensor {tuple(ref.shape)} {ref.dtype}"
            )
        if not torch.isfinite(value).all():
            raise StrategyContractError(f"Strategy {name} output '{key}' is not finite on a dry run")
