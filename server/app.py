"""Flower ServerApp: one federated run from config to report.

``ServerRun`` reads top to bottom in the order a run happens: resolve and dry-run the
aggregation rule and apply its client settings to the run's own copy of the config; load
the server's copy of the model and its fixed evaluation sets (``set_up``); compute the
initial adapter once (round 0: LoRA-GA's gradient estimate, ``server/initialisation.py``)
or, resuming, load the last checkpoint (``initial_adapter``); let Flower's FedAvg loop
send the global adapter, collect client adapters, screen them, aggregate them with the
rule and measure the barrier diagnostics (``rounds``, ``server/strategy.py``); after each
round evaluate the global adapter, write one row of metrics.jsonl and a checkpoint and
hand the row to the observers (``end_of_round``); at the end export the adapter in PEFT
format (``export``) and write report.md with plots (``finish``).
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

import strategies
from copra_core import protocol
from copra_core.adapters import AdapterState, export_adapter
from copra_core.allocation.export import export_allocated_adapter
from copra_core.allocation.proxies import build_proxy
from copra_core.base_offset import save_offsets
from copra_core.checkpoint import (
    FILE_NAME,
    Checkpoint,
    check_resumable,
    load_checkpoint,
    prepare_out_dir,
    restore_rng,
    save_checkpoint,
)
from copra_core.config import ConfigError, RunConfig
from copra_core.evaluator import ServerEvaluator
from copra_core.learner import model_bundle
from copra_core.reporting import MetricsLog, atomic_write_text, write_report
from copra_core.tracking import open_trackers
from server.allocation import AllocatedFedAvg, Allocator
from server.data_check import DataCheck, check_node_data
from server.diagnostics import LocalDiagnostics, RoundDiagnostics
from server.initialisation import initial_adapter
from server.metrics import pooled_metrics
from server.strategy import AdapterFedAvg

log = logging.getLogger(__name__)

#: Receives every finished round's metrics row (console display, tests).
RoundObserver = Callable[[dict], None]


def log_round(row: dict) -> None:
    """Default observer: one log line per round (visible in ``flwr run --stream``)."""
    keys = ("global/accuracy", "barrier/jensen_factor", "barrier/jensen_product", "barrier/pairwise_max")
    shown = ", ".join(f"{k}={row[k]:.4f}" for k in keys if isinstance(row.get(k), float))
    logging.getLogger("flwr").info("[copra-fl] round %s: %s", row["round"], shown)


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float) -> None:
    """Wait (bounded) until ``expected`` nodes are connected; a clear error otherwise.

    Without it, a federation with fewer nodes than ``federation.clients`` (e.g. Flower's
    default local federation of 2 supernodes) would wait for them forever.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= expected:
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"Only {connected} of federation.clients={expected} nodes connected after {timeout_s:.0f}s. "
                "Start more supernodes (simulation: --federation-config 'num-supernodes=N') "
                "or set federation.clients to the number of nodes."
            )
        time.sleep(1.0)


def check_allocation(config: RunConfig, rule: strategies.AggregationRule) -> None:
    """What HeteroLoRA allocation needs, checked before round 1: a clear error, not a silent fallback."""
    if not config.allocation.enabled:
        return
    build_proxy(config.allocation.proxy)  # an unknown proxy fails here, naming the key
    if not rule.partial_updates:
        raise ConfigError(
            f"Config key 'strategy.name': allocation.enabled needs a rule that averages each module over the "
            f"clients that trained it (masked); '{config.strategy.name}' would read untrained modules as zeros."
        )
    if config.init.method != "default":
        raise ConfigError(
            "Config key 'init.method': allocation.enabled needs init.method=default (LoRA-GA's initial B is "
            "not zero, so untrained modules would not be inactive)."
        )


def with_client_overrides(config: RunConfig, rule: strategies.AggregationRule) -> RunConfig:
    """A copy of ``config`` with the settings the rule imposes on the clients (e.g. FFA-LoRA freezes A).

    A copy: a simulation runs the ServerApp in a thread of the caller's process, and a
    change of the caller's config would leak into what it does next (benchmark caches).
    """
    config = copy.deepcopy(config)
    if rule.client_overrides:
        log.info("strategy %s sets %s", config.strategy.name, dict(rule.client_overrides))
        config.update(dict(rule.client_overrides))
    return config


class ServerRun:
    """One federated run on ``grid``; ``run`` reads in round order.

    ``set_up`` (output folder, checkpoint, the server's model and evaluation sets, the
    rule's dry run), ``initial_adapter`` (round 0 or the checkpoint), ``rounds`` (Flower's
    loop, with ``end_of_round`` after each), ``export`` (adapter, offsets, report).
    ``observers`` receive every finished row; ``finish`` is the end-of-run step.
    """

    def __init__(self, grid: Grid, config: RunConfig, observers: Sequence[RoundObserver] = (log_round,)) -> None:
        config.validate()
        self.grid = grid
        self.observers = tuple(observers)
        self.rule = strategies.build(config.strategy.name, config.strategy.options)
        check_allocation(config, self.rule)
        #: The run's own config (never the caller's object): the rule's client overrides applied.
        self.config = with_client_overrides(config, self.rule)
        self.out_dir = Path(self.config.out_dir)
        self.checkpoint: Checkpoint | None = None

    def run(self) -> Path:
        """The whole run; returns the output folder."""
        self.set_up()
        # Experiment trackers (tracking.backends) see every row as it is written; a failing
        # tracker warns once and is dropped, it never stops the run (copra_core/tracking).
        with open_trackers(self.config, self.out_dir) as trackers:
            self.observers = (*self.observers, trackers)
            with self.bundle.session(self.seeded_state):  # whatever an earlier run left in the model
                self.initial_adapter()
                self.rounds()
                self.export()
            self.finish()
            trackers.on_end(self.out_dir)
        return self.out_dir

    # ------------------------------------------------------------------ set-up
    def set_up(self) -> None:
        """Output folder and config.json, the checkpoint (resuming), the server's model, its
        evaluation sets, the rule's dry run; then wait for the nodes."""
        config = self.config
        # An out-dir holding a finished run is refused unless resuming or overwriting (flwr run
        # deployments reach this without copra-fl simulate's preflight, which did it already).
        prepare_out_dir(self.out_dir, resume=config.federation.resume, overwrite=config.federation.overwrite)
        if config.federation.resume:
            self.checkpoint = load_checkpoint(self.out_dir)
            check_resumable(self.checkpoint, config.to_flat(), self.out_dir / FILE_NAME)
            log.info("resuming %s after round %d", self.out_dir, self.checkpoint.round)
        atomic_write_text(self.out_dir / "config.json", config.to_json())
        self.bundle = model_bundle(config)
        self.seeded_state = self.bundle.initial_state()
        strategies.dry_run(self.rule, self.seeded_state)  # a broken rule fails here, before round 1
        task, batch_size = self.bundle.task, config.diagnostics.batch_size
        #: None when the server holds no data (data.server-eval): the clients' pooled evaluation stands in.
        self.global_eval: ServerEvaluator | None = None
        self.diagnostics: RoundDiagnostics | None = None
        if config.data.server_has_data:
            self.global_eval = ServerEvaluator(self.bundle, task.server_examples(config.data.eval_size), batch_size)
            diag_eval = ServerEvaluator(self.bundle, task.server_examples(config.diagnostics.sample_size), batch_size)
            self.diagnostics = RoundDiagnostics(
                diag_eval, config.diagnostics, config.interpolation_grid(), config.seed, self.rule.partial_updates
            )
        rows = self.checkpoint.metrics if self.checkpoint else ()
        self.metrics_log = MetricsLog(self.out_dir / "metrics.jsonl", rows=rows)
        wait_for_nodes(self.grid, config.federation.clients, config.federation.wait_for_nodes_s)
        # Own data: every node summarises its data before round 1; a node whose data does not fit is left out.
        self.data_check = check_node_data(self.grid, config) if config.data.own_data else DataCheck()

    # ------------------------------------------------------------------ round 0
    def initial_adapter(self) -> None:
        """The initial adapter and its base offsets (LoRA-GA: from a gradient estimate), or the checkpoint's."""
        config, bundle, checkpoint = self.config, self.bundle, self.checkpoint
        if checkpoint is None:
            self.initial_state, init_offsets, self.init_metrics = initial_adapter(
                self.grid, config, bundle, self.seeded_state
            )
        else:
            self.initial_state = checkpoint.tensors["initial"] or self.seeded_state
            init_offsets, self.init_metrics = checkpoint.tensors["init_offsets"], {}
        self.strategy = self.build_strategy(checkpoint.tensors["global"] if checkpoint else self.initial_state)
        self.strategy.sampler.exclude(self.data_check.excluded)
        self.init_metrics.update(self.data_check.metrics)
        if init_offsets:
            self.strategy.set_init_offsets(init_offsets)
            bundle.base_offsets.apply(bundle.model, self.strategy.base_offsets.all)
            # The clients report the same checksum of their bases every round (clients/base_crc32).
            self.init_metrics["init/base_crc32"] = bundle.base_offsets.checksum(bundle.model)
        if checkpoint is not None:
            self.rule.load_state_dict(checkpoint.tensors["rule"])
            self.strategy.resume(checkpoint.round, checkpoint.tensors["rule_offsets"])
            if isinstance(self.strategy, AllocatedFedAvg):  # the allocation in force (a static one is not re-scored)
                self.strategy.allocator.load_state_dict(checkpoint.server_state.get("allocation", {}))
            bundle.base_offsets.apply(bundle.model, self.strategy.base_offsets.all)
            restore_rng(checkpoint)
        else:
            random.seed(config.seed)  # node sampling seeds its own draws (server/sampling.py)

    def build_strategy(self, global_state: AdapterState) -> AdapterFedAvg:
        """Flower's FedAvg loop with the rule, the diagnostics and the run's sampling settings."""
        config, bundle, federation = self.config, self.bundle, self.config.federation
        where = config.diagnostics_where()  # the clients resolve it alike, from the config they receive
        settings = dict(
            rule=self.rule,
            initial_state=global_state,
            transport_dtype=federation.transport_dtype,
            diagnostics=self.diagnostics if config.diagnostics.enabled and where in ("server", "both") else None,
            local_diagnostics=(
                LocalDiagnostics(config.interpolation_grid(), bundle.task.metric)
                if config.diagnostics.enabled and where in ("clients", "both")
                else None
            ),
            on_base_offset=lambda offsets: bundle.base_offsets.apply(bundle.model, offsets),
            base_checksum=lambda: bundle.base_offsets.checksum(bundle.model),
            screening=config.screening,
            fraction_train=federation.fraction_train,
            fraction_evaluate=federation.fraction_evaluate,
            min_train_nodes=federation.min_train_nodes,
            min_evaluate_nodes=min(federation.min_train_nodes, federation.clients),
            # wait_for_nodes waited for all clients once; later rounds go on with the live
            # nodes (a dropped node must not stall the federation) as long as enough remain.
            min_available_nodes=federation.min_train_nodes,
            sampling_seed=config.seed,
            partition_timeout=federation.wait_for_nodes_s * 10,
            evaluate_metrics_aggr_fn=pooled_metrics(bundle.task.summarise),
        )
        if config.allocation.enabled:
            return AllocatedFedAvg(allocator=Allocator(config, self.seeded_state), **settings)
        return AdapterFedAvg(**settings)

    # ------------------------------------------------------------------ rounds
    def rounds(self) -> None:
        """Flower's round loop; ``end_of_round`` runs after every round (and once before round 1)."""
        flat = self.config.to_flat()
        self.strategy.start(
            grid=self.grid,
            initial_arrays=self.strategy.initial_arrays(),
            num_rounds=self.config.federation.rounds - self.strategy.completed_rounds,
            timeout=self.config.federation.round_timeout_s,
            train_config=ConfigRecord({**flat, protocol.NUM_ROUNDS: self.config.federation.rounds}),
            evaluate_config=ConfigRecord(flat),
            evaluate_fn=self.end_of_round,
        )

    def end_of_round(self, flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate the global adapter, record the round's row and a checkpoint."""
        server_round = self.strategy.run_round(flower_round)
        if self.checkpoint is not None and flower_round == 0:
            return None  # resumed: this round's row and checkpoint exist already
        result = self.global_evaluation(server_round)
        row: dict = {"round": server_round, **{f"global/{k}": v for k, v in result.items()}}
        # Task-specific extras on the global adapter the model now holds (causal_lm: generation, ROUGE-L).
        row.update(
            self.bundle.task.after_round(self.bundle.model, server_round, self.config.federation.rounds, self.out_dir)
        )
        row.update(self.init_metrics if server_round == 0 else self.strategy.finish_round())
        self.metrics_log.append(row)
        self.write_checkpoint(server_round)
        for observer in self.observers:
            observer(row)
        return MetricRecord({f"global/{k}": v for k, v in result.items()}) if result else None

    def global_evaluation(self, server_round: int) -> dict[str, float]:
        """The global adapter's metrics: on the server's evaluation set, or without one
        (``data.server-eval=none``) the round's pooled federated evaluation (none in round 0)."""
        if self.global_eval is not None:
            return self.global_eval.factor(self.strategy.current)
        federated = self.strategy.round_metrics if server_round > 0 else {}
        return {k.removeprefix("federated/"): v for k, v in federated.items() if k.startswith("federated/")}

    def write_checkpoint(self, server_round: int) -> None:
        strategy = self.strategy
        offsets = strategy.base_offsets
        tensors = {"global": strategy.current, "init_offsets": offsets.init, "rule": self.rule.state_dict()}
        tensors |= {"rule_offsets": offsets.rule, "initial": self.initial_state if offsets.init else {}}
        server_state = {"allocation": strategy.allocator.state_dict()} if isinstance(strategy, AllocatedFedAvg) else {}
        checkpoint = Checkpoint(
            server_round, self.config.to_flat(), tensors, self.metrics_log.rows, server_state=server_state
        )
        save_checkpoint(self.out_dir, checkpoint)

    # ------------------------------------------------------------------ end
    def export(self) -> None:
        """The final adapter in PEFT format (and a rule's base offsets next to it)."""
        current, offsets = self.strategy.current, self.strategy.base_offsets
        if self.config.allocation.enabled:
            # Only the modules in use, each at its own rank (PEFT rank_pattern).
            export_allocated_adapter(self.bundle.model, current, self.out_dir / "adapter")
        else:
            # LoRA-GA's offset only cancels its initial factors: fold them into the exported
            # adapter (rank 2r), which then needs no offset on the original base.
            initial = self.initial_state if offsets.init else None
            export_adapter(self.bundle.model, current, self.out_dir / "adapter", initial=initial)
        if offsets.rule:
            # A strategy's offsets (residual) are full rank: ship them next to the adapter
            # (docs/strategies.md shows how to apply them).
            save_offsets(offsets.rule, self.out_dir / "base_offset.safetensors")

    def finish(self) -> None:
        """report.md with its plots, from every row of the run."""
        config = self.config
        method = "CopRA" if config.copra.enabled else "plain LoRA"
        write_report(
            self.out_dir,
            self.metrics_log.rows,
            config.to_json(),
            self.bundle.task.metric,
            title=f"copra-fl run: {config.task} on {config.data.dataset}, strategy {config.strategy.name}, {method}"
            + (
                ""
                if config.data.server_has_data
                else " (the server holds no data: global accuracy and loss are the clients' pooled federated "
                "evaluation on their validation rows, data.server-eval)"
            ),
        )


def run_server(grid: Grid, config: RunConfig, observers: Sequence[RoundObserver] = (log_round,)) -> Path:
    """Run the federation described by ``config`` (left unchanged); return the output folder."""
    return ServerRun(grid, config, observers).run()


def make_server_app(
    config: RunConfig | Sequence[RunConfig] | None = None,
    observers: Sequence[RoundObserver] = (log_round,),
    after_run: Callable[[RunConfig], None] | None = None,
) -> ServerApp:
    """A ServerApp bound to ``config`` (``copra-fl simulate``), or reading Flower's run config.

    A sequence of configs is a sweep: the runs go one after the other on the same nodes
    (``simulations.runner.simulate_many``); ``after_run`` is called after each.
    """
    server_app = ServerApp()
    configs = [config] if isinstance(config, RunConfig) else list(config or ())

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        for run_config in configs or [RunConfig.from_flat(dict(context.run_config))]:
            run_server(grid, run_config, observers)
            if after_run is not None:
                after_run(run_config)

    return server_app


#: Entry point for ``flwr run .`` (pyproject: serverapp = "server.app:app").
app = make_server_app()
