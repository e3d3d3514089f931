"""A client's local learner: the task, the LoRA model and its data, reused across rounds.

Loading a model costs seconds, so one model per process is cached and shared by every
partition the process serves (a simulation actor serves several) and by consecutive runs
of a sweep; only the data is per partition. The adapter itself comes from the server
every round. Every use of the shared model starts with ``ModelBundle.session``, which
sets the adapter and the base offsets it works with: nothing of an earlier use (another
client, another run) survives into the next.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache

import torch
from peft import PeftModel

from copra_core.adapters import AdapterState, get_adapter_state, set_adapter_state
from copra_core.allocation.masking import ClientPlan, partial_state, restricted_training
from copra_core.allocation.proxies import score_modules
from copra_core.base_offset import BaseOffsets
from copra_core.config import RunConfig
from copra_core.copra import BlockDropper, all_blocks_active
from copra_core.data import NodeFiles, source_identity
from copra_core.device import resolve_device
from copra_core.init.gradients import estimate_weight_gradients
from copra_core.lora import build_peft_model, lora_layers_by_block
from copra_core.tasks import Batch, Task, build_task
from copra_core.tasks.base import ClientExamples
from copra_core.training import RoundSchedule, evaluation_sums, train_local

log = logging.getLogger(__name__)

#: Config sections whose every field shapes the model a bundle builds: the architecture,
#: the LoRA layout and the task, which reads the data settings (the head's label count, the
#: server's evaluation sample) and causal-LM formatting and generation from the config it
#: was built with; plus the top-level fields that do.
MODEL_SECTIONS = ("model", "lora", "data", "causal-lm")
MODEL_FIELDS = ("task", "seed", "device")
#: Fields of those sections read at every training call, not when the model is built.
PER_CALL_FIELDS = ("lora.freeze-a",)
#: The flat keys that decide how the model is built; a change of any other key reuses it.
MODEL_KEYS = tuple(
    key
    for key in RunConfig().to_flat()
    if (key in MODEL_FIELDS or key.split(".")[0] in MODEL_SECTIONS) and key not in PER_CALL_FIELDS
)


class ModelBundle:
    """Task + PEFT model + its blocks for one config, on one device."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        self.task: Task = build_task(config)
        # transformers initialises missing weights (the new head) from torch's global RNG:
        # seed it so the server's initial adapter is the same in every run.
        torch.manual_seed(config.seed)
        base, new_modules = self.task.load_model()
        self.model: PeftModel = build_peft_model(base, config.lora, new_modules, config.seed).to(self.device)
        self.blocks = lora_layers_by_block(self.model)
        self.base_offsets = BaseOffsets()
        # Kept apart from the model, whose adapter changes with every fit and evaluation:
        # a second run in the same process must start from the same seeded adapter.
        self._initial_state = get_adapter_state(self.model)

    def initial_state(self) -> AdapterState:
        """The seeded initial adapter (a copy), whatever the model holds now."""
        return {key: value.clone() for key, value in self._initial_state.items()}

    @contextlib.contextmanager
    def session(
        self, state: Mapping[str, torch.Tensor], offsets: Mapping[str, torch.Tensor] | None = None
    ) -> Iterator[PeftModel]:
        """Use the shared model with adapter ``state`` on the base offset by ``offsets`` (none: the original).

        The one reset point of the process-wide model: a client's round, an evaluation, a
        gradient estimate or a whole server run starts here, so the adapter and base
        weights an earlier use left behind (another client, another run of a sweep) never
        leak in. Which parameters train is put back on exit.
        """
        set_adapter_state(self.model, state)
        self.base_offsets.apply(self.model, offsets or {})
        trainable = [param.requires_grad for param in self.model.parameters()]
        try:
            yield self.model
        finally:
            for param, requires_grad in zip(self.model.parameters(), trainable, strict=True):
                param.requires_grad_(requires_grad)


def calibration_gradients(
    bundle: ModelBundle, config: RunConfig, state: AdapterState, examples: Sequence, seed: int
) -> dict[str, torch.Tensor]:
    """Mean full-weight gradient of every LoRA base layer on ``init.calibration-batches`` batches.

    Taken at ``state`` on the original (un-offset) base with every block active: the
    starting point LoRA-GA prepares. The same code serves the server's calibration sample
    and each client's partition (``init.source``).
    """
    cfg = config  # not bundle.config: a bundle serves every run whose MODEL_KEYS agree
    batches = bundle.task.train_batches(
        examples,
        cfg.init.batch_size or cfg.train.batch_size,
        cfg.init.calibration_batches,
        seed=seed,
        offset=0,
        group_by_length=cfg.train.group_by_length,
    )
    # Seeded dropout masks, without disturbing the caller's global RNG stream.
    with bundle.session(state), torch.random.fork_rng(devices=[]), all_blocks_active(bundle.blocks):
        torch.manual_seed(seed)
        gradients, count = estimate_weight_gradients(bundle.model, bundle.task, batches, bundle.device)
    if count != cfg.init.calibration_batches:
        raise RuntimeError(
            f"gradient estimate used {count} batches, init.calibration-batches is {cfg.init.calibration_batches}"
        )
    return gradients


_BUNDLES: dict[str, ModelBundle] = {}


def model_key(config: RunConfig) -> str:
    """The model cache's key: a hash of the config's ``MODEL_KEYS``."""
    return config.fingerprint(MODEL_KEYS)


def model_bundle(config: RunConfig) -> ModelBundle:
    """The process-wide model for this config (built once)."""
    key = model_key(config)
    if key not in _BUNDLES:
        _BUNDLES.clear()  # one model per process: a new config replaces the old one
        _BUNDLES[key] = ModelBundle(config)
    return _BUNDLES[key]


@lru_cache(maxsize=16)
def _client_data(
    task: Task, data_key: str, partition_id: int, num_partitions: int, node_files: NodeFiles | None, identity: tuple
) -> ClientExamples:
    del data_key, identity  # part of the cache key only
    return task.client_data(partition_id, num_partitions, node_files)


class ClientLearner:
    """Trains and evaluates one client's adapter on its own partition."""

    def __init__(
        self, config: RunConfig, partition_id: int, num_partitions: int, node_files: NodeFiles | None = None
    ) -> None:
        """``node_files``: a deployed node's own files (its node config's ``data-path``, ``val-path``)."""
        self.config = config
        self.partition_id = partition_id
        self.bundle = model_bundle(config)
        data_key = config.fingerprint((*tuple(k for k in config.to_flat() if k.startswith("data.")), "seed"))
        # Own data: the files' sizes and modification times join the key, so an edited file is read again.
        identity = source_identity(config.data, node_files) if node_files or config.data.is_path else ()
        self.train_examples, self.val_examples, self.data_summary = _client_data(
            self.bundle.task, data_key, partition_id, num_partitions, node_files, identity
        )

    @property
    def num_train_examples(self) -> int:
        return len(self.train_examples)

    def round_batches(self, server_round: int) -> Iterator[Batch]:
        """This client's batches for a round: a seeded shuffle, continued round after round."""
        cfg = self.config
        return self.bundle.task.train_batches(
            self.train_examples,
            cfg.train.batch_size,
            cfg.train.local_steps,
            seed=_mix(cfg.seed, self.partition_id, 0),
            offset=(server_round - 1) * cfg.train.local_steps * cfg.train.batch_size,
            group_by_length=cfg.train.group_by_length,
        )

    def fit(
        self,
        state: AdapterState,
        server_round: int,
        num_rounds: int,
        base_offset: Mapping[str, torch.Tensor] | None = None,
        plan: ClientPlan | None = None,
    ) -> tuple[AdapterState, dict[str, float]]:
        """Train the global adapter ``state`` for one round; returns (reply adapter, metrics).

        ``plan`` (HeteroLoRA allocation): only its modules train, at its rank, and the reply
        holds just those factors plus the dense tensors.
        """
        with self.bundle.session(state, base_offset):
            return self._train_round(server_round, num_rounds, plan)

    def _train_round(
        self, server_round: int, num_rounds: int, plan: ClientPlan | None
    ) -> tuple[AdapterState, dict[str, float]]:
        cfg, bundle = self.config, self.bundle
        # Dropout and LoRA-dropout draw from torch's global RNG: seed it per (client, round)
        # so a round's result does not depend on which process ran which client before.
        torch.manual_seed(_mix(cfg.seed, self.partition_id, server_round, 1))
        schedule = RoundSchedule(server_round, num_rounds, cfg.train.local_steps)
        dropper = BlockDropper(
            bundle.blocks,
            enabled=cfg.copra.enabled,
            p0=cfg.copra.p0,
            full_at=cfg.copra.full_at,
            seed=_mix(cfg.seed, self.partition_id, server_round),
            base_offsets=bundle.base_offsets,
        )
        batches = self.round_batches(server_round)
        restriction = restricted_training(bundle.model, plan) if plan is not None else contextlib.nullcontext()
        with restriction:
            metrics = train_local(
                bundle.model,
                bundle.task,
                batches,
                schedule=schedule,
                dropper=dropper,
                lr=cfg.train.lr,
                weight_decay=cfg.train.weight_decay,
                lr_schedule=cfg.train.lr_schedule,
                head_lr=cfg.train.head_lr,
                freeze_a=cfg.lora.freeze_a,
                device=bundle.device,
            )
        trained = get_adapter_state(bundle.model)
        if plan is None:
            return trained, metrics
        metrics |= {"lora-rank": float(plan.rank), "modules-trained": float(len(plan.modules))}
        return partial_state(trained, plan), metrics

    def proxy_scores(self, state: AdapterState) -> tuple[dict[str, float], bool]:
        """This client's zero-cost proxy score of every LoRA module (HeteroLoRA allocation).

        Scored at ``state`` (the current global adapter) on the original base, on
        ``allocation.scoring-batches`` of this client's own batches; (scores, B probed).
        """
        cfg, bundle = self.config, self.bundle
        seed = _mix(cfg.seed, self.partition_id, 3)
        batches = list(
            bundle.task.train_batches(
                self.train_examples,
                cfg.train.batch_size,
                cfg.allocation.scoring_batches,
                seed=seed,
                offset=0,
                group_by_length=cfg.train.group_by_length,
            )
        )
        with bundle.session(state):
            return score_modules(
                bundle.model,
                bundle.blocks,
                bundle.task,
                batches,
                bundle.device,
                proxy=cfg.allocation.proxy,
                probe_std=cfg.allocation.probe_b_std,
                seed=seed,
            )

    def evaluation_sums(
        self, state: AdapterState, base_offset: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, float]:
        """The task's additive statistics of ``state`` on this client's validation examples."""
        bundle = self.bundle
        batches = bundle.task.eval_batches(self.val_examples, self.config.diagnostics.batch_size)
        with bundle.session(state, base_offset):
            return evaluation_sums(bundle.model, bundle.task, batches, bundle.device)

    def evaluate(self, state: AdapterState, base_offset: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
        return self.bundle.task.summarise(self.evaluation_sums(state, base_offset))

    def gradient_estimate(self, state: AdapterState) -> dict[str, torch.Tensor]:
        """This client's full-weight gradient estimate for LoRA-GA (``init.source=clients``)."""
        seed = _mix(self.config.seed, self.partition_id, 2)
        return calibration_gradients(self.bundle, self.config, state, self.train_examples, seed)

    def base_checksum(self) -> int:
        """CRC32 of this process's offset base weights (equal on every client of a run)."""
        return self.bundle.base_offsets.checksum(self.bundle.model)


def _mix(*values: int) -> int:
    """Deterministic seed from several integers (Python's hash() is salted per process)."""
    seed = 0
    for value in values:
        seed = (seed * 1_000_003 + value) % (2**63 - 1)
    return seed
