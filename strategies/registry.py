"""Resolve a strategy spec to a checked, configured rule instance.

Three ways to name a rule, tried in this order:

1. a built-in name (``BUILTIN``, one module per rule in this package);
2. an installed plug-in: entry-point group ``copra_fl.strategies``, so a third-party
   package that declares ``[project.entry-points."copra_fl.strategies"] my_rule =
   "my_pkg.rules:MyRule"`` is usable as ``strategy.name = "my_rule"``;
3. a dotted path ``package.module:Class`` (importable from the server process).

Options come from ``strategy.options`` and are checked against ``__init__``'s signature.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import typing
from collections.abc import Mapping
from importlib.metadata import entry_points

import torch

from copra_core.config import ConfigError, convert_value, split_csv
from strategies.base import AggregationRule, ClientUpdate, StrategyContractError
from strategies.dare import DareMerge
from strategies.fedopt import FedAdamRule, FedYogiRule
from strategies.fedrot import RotationAlignedAveraging
from strategies.ffa import FrozenAAveraging
from strategies.flora import StackedMerge
from strategies.linear import LinearAveraging
from strategies.lora_fair import ResidualCorrectedAveraging
from strategies.masked import MaskedAveraging
from strategies.median import CoordinateMedian
from strategies.norm_clip import NormClipAveraging
from strategies.product_svd import ProductSVD
from strategies.residual import ResidualFold
from strategies.ties import TiesMerge
from strategies.trimmed_mean import TrimmedMean

BUILTIN: dict[str, type[AggregationRule]] = {
    rule.name: rule
    for rule in (
        LinearAveraging,
        FrozenAAveraging,
        ProductSVD,
        ResidualFold,
        CoordinateMedian,
        TrimmedMean,
        NormClipAveraging,
        TiesMerge,
        DareMerge,
        FedAdamRule,
        FedYogiRule,
        MaskedAveraging,
        RotationAlignedAveraging,
        ResidualCorrectedAveraging,
        StackedMerge,
    )
}

ENTRY_POINT_GROUP = "copra_fl.strategies"
KEY = "strategy.name"


def plugins() -> dict[str, object]:
    """Installed plug-ins by name (entry points, not yet imported)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Every name ``strategy.name`` accepts besides dotted paths."""
    return sorted(set(BUILTIN) | set(plugins()))


def resolve(spec: str) -> type[AggregationRule]:
    """A built-in or plug-in name, or a dotted path ``package.module:Class`` -> class.

    A name that resolves to nothing is a ConfigError; a class that breaks the rule contract
    (or a plug-in that fails to load) is a StrategyContractError.
    """
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ConfigError(f"Config key '{KEY}': cannot import module '{module_name}' ({err})") from err
        if not hasattr(module, attr):
            raise ConfigError(f"Config key '{KEY}': module '{module_name}' has no '{attr}'")
        cls = getattr(module, attr)
    elif spec in BUILTIN:
        cls = BUILTIN[spec]
    elif spec in (installed := plugins()):
        entry_point = installed[spec]
        try:
            cls = entry_point.load()
        except Exception as err:  # a broken plug-in must name itself, whatever it raised
            raise StrategyContractError(
                f"Config key '{KEY}': plug-in '{spec}' ({entry_point.value}) failed to load: {err!r}"
            ) from err
    else:
        close = difflib.get_close_matches(spec, available(), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ConfigError(
            f"Config key '{KEY}': unknown strategy '{spec}'. Known: {available()}; "
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


def option_types(cls: type[AggregationRule]) -> dict[str, tuple[type, object]]:
    """``__init__`` keyword options -> (type, default). Every option needs a default."""
    hints = typing.get_type_hints(cls.__init__)
    options: dict[str, tuple[type, object]] = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is param.empty:
            raise StrategyContractError(f"Strategy {cls.__qualname__}: option '{name}' needs a default value")
        typ = hints.get(name, type(param.default))
        if typ not in (bool, int, float, str):
            raise StrategyContractError(
                f"Strategy {cls.__qualname__}: option '{name}' must be typed bool, int, float or str, not {typ}"
            )
        options[name] = (typ, param.default)
    return options


def parse_options(cls: type[AggregationRule], text: str) -> dict[str, object]:
    """``"trim-fraction=0.2, seed=3"`` -> ``{"trim_fraction": 0.2, "seed": 3}``, checked."""
    known = option_types(cls)
    parsed: dict[str, object] = {}
    for item in split_csv(text):
        name, sep, raw = item.partition("=")
        attr = name.strip().replace("-", "_")
        if not sep:
            raise ConfigError(f"Config key 'strategy.options': '{item}' is not 'name=value'")
        if attr not in known:
            listed = sorted(n.replace("_", "-") for n in known) or "none"
            raise ConfigError(
                f"Config key 'strategy.options': strategy {cls.__qualname__} has no option '{name.strip()}' "
                f"(its options: {listed})"
            )
        parsed[attr] = convert_value(f"strategy.options: {name.strip()}", raw.strip(), known[attr][0])
    return parsed


def build(spec: str, options: str = "") -> AggregationRule:
    """Resolve ``spec`` and construct it with ``options``; every failure names its cause."""
    cls = resolve(spec)
    kwargs = parse_options(cls, options)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        if isinstance(err, StrategyContractError):
            raise
        raise ConfigError(f"Config key 'strategy.options': strategy '{spec}' rejected {kwargs}: {err}") from err


def dry_run(rule: AggregationRule, template: Mapping[str, torch.Tensor]) -> None:
    """Check the rule's output contract before round 1, on a copy of the rule.

    Three synthetic clients holding perturbed copies of the initial adapter (three, so
    robust rules that trim or take medians have something to do); the output must have
    the template's keys, shapes and dtypes and be finite.
    """
    generator = torch.Generator().manual_seed(0)
    frozen_a = rule.client_overrides.get("lora.freeze-a", False)
    updates = [
        ClientUpdate(
            node_id=i,
            state={
                k: v
                if frozen_a and k.endswith(".lora_A.weight")
                else v + 0.01 * torch.randn(v.shape, generator=generator)
                for k, v in template.items()
            },
            num_examples=10 * (i + 1),
        )
        for i in range(3)
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


def describe(cls: type[AggregationRule]) -> str:
    """First docstring line and options, for ``copra-fl strategies``."""
    summary = (inspect.getdoc(cls) or "").split("\n", 1)[0]
    opts = ", ".join(f"{n.replace('_', '-')}={d!r}" for n, (_, d) in option_types(cls).items())
    return f"{summary}" + (f" Options: {opts}." if opts else "")
