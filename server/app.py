"""Flower ServerApp: one federated run from config to report.

Read top to bottom, a run is: validate the config; load the server's copy of the model
and its fixed evaluation sets; resolve and dry-run the aggregation rule; compute the
initial adapter once (round 0: LoRA-GA's gradient estimate, ``server/initialisation.py``)
or, resuming, load the last checkpoint; let Flower's FedAvg loop send the global
adapter, collect client adapters, screen them, aggregate them with the rule and measure
the barrier diagnostics (``server/strategy.py``); after each round, evaluate the global
adapter, write one row of metrics.jsonl and a checkpoint; at the end export the adapter
in PEFT format and write report.md with plots.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

import strategies
from copra_core.adapters import AdapterState, export_adapter, set_adapter_state
from copra_core.allocation.export import export_allocated_adapter
from copra_core.allocation.masking import effective_state
from copra_core.allocation.merge import pad_average, product_average
from copra_core.allocation.proxies import build_proxy
from copra_core.base_offset import save_offsets
from copra_core.checkpoint import (
    FILE_NAME,
    Checkpoint,
    check_resumable,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from copra_core.config import ConfigError, RunConfig
from copra_core.diagnostics import MaskedAverages, round_diagnostics
from copra_core.evaluator import ServerEvaluator
from copra_core.learner import model_bundle
from copra_core.reporting import MetricsLog, atomic_write_text, write_report
from server.allocation import Allocator
from server.initialisation import initial_adapter
from server.metrics import pooled_metrics
from server.strategy import AdapterFedAvg
from strategies.base import ClientUpdate

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


def run_server(grid: Grid, config: RunConfig, observers: Sequence[RoundObserver] = (log_round,)) -> Path:
    """Run the federation described by ``config``; return the output folder."""
    config.validate()
    rule = strategies.build(config.strategy.name, config.strategy.options)
    check_allocation(config, rule)
    if rule.client_overrides:
        # e.g. FFA-LoRA freezes A on every client; the clients read the config sent below.
        log.info("strategy %s sets %s", config.strategy.name, dict(rule.client_overrides))
        config.update(dict(rule.client_overrides))
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = None
    if config.federation.resume:
        checkpoint = load_checkpoint(out_dir)
        check_resumable(checkpoint, config.to_flat(), out_dir / FILE_NAME)
        log.info("resuming %s after round %d", out_dir, checkpoint.round)
    atomic_write_text(out_dir / "config.json", config.to_json())

    bundle = model_bundle(config)
    task = bundle.task
    seeded_state = bundle.initial_state()
    set_adapter_state(bundle.model, seeded_state)  # the cached model may hold a previous run's adapter
    bundle.base_offsets.apply(bundle.model, {})  # ... and a previous run's base offsets
    strategies.dry_run(rule, seeded_state)  # a broken rule fails here, before round 1

    global_eval = ServerEvaluator(bundle, task.server_examples(config.data.eval_size), config.diagnostics.batch_size)
    diag_eval = ServerEvaluator(
        bundle, task.server_examples(config.diagnostics.sample_size), config.diagnostics.batch_size
    )
    grid_alphas = config.interpolation_grid()

    def diagnostics(
        server_round: int, updates: Sequence[ClientUpdate], aggregate: AdapterState, offset_change: AdapterState
    ) -> dict:
        states, masked = [u.state for u in updates], None
        if rule.partial_updates:
            # Clients trained different modules/ranks: compare the adapters their models held,
            # and average each module over the clients that trained it.
            current = strategy.previous
            partials = [(u.state, float(u.num_examples)) for u in updates]
            states = [effective_state(u.state, current) for u in updates]
            product, dense = product_average(partials, current)
            masked = MaskedAverages(factor=pad_average(partials, current), product=product, dense=dense)
        metrics, clients, curves = round_diagnostics(
            states,
            [u.num_examples for u in updates],
            aggregate,
            diag_eval,
            grid=grid_alphas,
            num_pairs=config.diagnostics.pairs,
            seed=config.seed * 10_007 + server_round,
            offset_change=offset_change,
            masked=masked,
        )
        metrics["clients"] = [
            {"partition-id": int(u.metrics.get("partition-id", -1)), "num-examples": u.num_examples, **c}
            for u, c in zip(updates, clients, strict=True)
        ]
        metrics["curves"] = [vars(c) | {"pair": list(c.pair)} for c in curves]
        return metrics

    metrics_log = MetricsLog(out_dir / "metrics.jsonl", rows=checkpoint.metrics if checkpoint else ())
    wait_for_nodes(grid, config.federation.clients, config.federation.wait_for_nodes_s)
    if checkpoint is None:
        # Round 0: the initial adapter (LoRA-GA: from a gradient estimate) and its base offsets.
        initial_state, init_offsets, init_metrics = initial_adapter(grid, config, bundle, seeded_state)
    else:
        initial_state = checkpoint.tensors["initial"] or seeded_state
        init_offsets, init_metrics = checkpoint.tensors["init_offsets"], {}

    strategy = AdapterFedAvg(
        rule=rule,
        initial_state=checkpoint.tensors["global"] if checkpoint else initial_state,
        transport_dtype=config.federation.transport_dtype,
        diagnostics=diagnostics if config.diagnostics.enabled else None,
        on_base_offset=lambda offsets: bundle.base_offsets.apply(bundle.model, offsets),
        base_checksum=lambda: bundle.base_offsets.checksum(bundle.model),
        screening=config.screening,
        fraction_train=config.federation.fraction_train,
        fraction_evaluate=config.federation.fraction_evaluate,
        min_train_nodes=config.federation.min_train_nodes,
        min_evaluate_nodes=min(config.federation.min_train_nodes, config.federation.clients),
        # wait_for_nodes above waited for all clients once; later rounds go on with the live
        # nodes (a dropped node must not stall the federation) as long as enough remain.
        min_available_nodes=config.federation.min_train_nodes,
        allocator=Allocator(config, seeded_state) if config.allocation.enabled else None,
        sampling_seed=config.seed,
        partition_timeout=config.federation.wait_for_nodes_s * 10,
        evaluate_metrics_aggr_fn=pooled_metrics(bundle.task.summarise),
    )
    if init_offsets:
        strategy.set_init_offsets(init_offsets)
        bundle.base_offsets.apply(bundle.model, strategy.offsets)
        # The clients report the same checksum of their bases every round (clients/base_crc32).
        init_metrics["init/base_crc32"] = bundle.base_offsets.checksum(bundle.model)
    if checkpoint is not None:
        rule.load_state_dict(checkpoint.tensors["rule"])
        strategy.resume(checkpoint.round, checkpoint.tensors["rule_offsets"])
        if strategy.allocator is not None:  # the allocation in force (a static one is not re-scored)
            strategy.allocator.load_state_dict(checkpoint.server_state.get("allocation", {}))
        bundle.base_offsets.apply(bundle.model, strategy.offsets)
        restore_rng(checkpoint)
    else:
        random.seed(config.seed)  # node sampling seeds its own draws (server/sampling.py)

    def write_checkpoint(server_round: int) -> None:
        tensors = {"global": strategy.current, "init_offsets": strategy.init_offsets, "rule": rule.state_dict()}
        tensors |= {"rule_offsets": strategy.rule_offsets, "initial": initial_state if init_offsets else {}}
        server_state = {"allocation": strategy.allocator.state_dict()} if strategy.allocator else {}
        save_checkpoint(
            out_dir, Checkpoint(server_round, config.to_flat(), tensors, metrics_log.rows, server_state=server_state)
        )

    def end_of_round(flower_round: int, arrays) -> MetricRecord | None:
        """Flower calls this after every round (and once before round 1): evaluate, record, checkpoint."""
        server_round = flower_round + strategy.completed_rounds
        if checkpoint is not None and flower_round == 0:
            return None  # resumed: this round's row and checkpoint exist already
        result = global_eval.factor(strategy.current)
        row: dict = {"round": server_round}
        row.update({f"global/{k}": v for k, v in result.items()})
        # Task-specific extras on the global adapter the model now holds (causal_lm: generation, ROUGE-L).
        row.update(task.after_round(bundle.model, server_round, config.federation.rounds, out_dir))
        if server_round == 0:
            row.update(init_metrics)
        else:
            row.update({k: v for k, v in strategy.round_metrics.items() if not k.startswith("_")})
            row["time/round_s"] = time.perf_counter() - strategy.round_metrics["_t_start"]
        metrics_log.append(row)
        write_checkpoint(server_round)
        for observer in observers:
            observer(row)
        return MetricRecord({f"global/{k}": v for k, v in result.items()})

    train_config = ConfigRecord({**config.to_flat(), "num-rounds": config.federation.rounds})
    strategy.start(
        grid=grid,
        initial_arrays=strategy.initial_arrays(),
        num_rounds=config.federation.rounds - strategy.completed_rounds,
        timeout=config.federation.round_timeout_s,
        train_config=train_config,
        evaluate_config=ConfigRecord(config.to_flat()),
        evaluate_fn=end_of_round,
    )

    # LoRA-GA's offset only cancels its initial factors: fold them into the exported adapter
    # (rank 2r), which then needs no offset on the original base.
    if config.allocation.enabled:
        # Only the modules in use, each at its own rank (PEFT rank_pattern).
        export_allocated_adapter(bundle.model, strategy.current, out_dir / "adapter")
    else:
        export_adapter(
            bundle.model, strategy.current, out_dir / "adapter", initial=initial_state if init_offsets else None
        )
    if strategy.rule_offsets:
        # A strategy's offsets (residual) are full rank: ship them next to the adapter
        # (docs/strategies.md shows how to apply them).
        save_offsets(strategy.rule_offsets, out_dir / "base_offset.safetensors")
    write_report(
        out_dir,
        metrics_log.rows,
        config.to_json(),
        task.metric,
        title=f"copra-fl run: {config.task} on {config.data.dataset}, strategy {config.strategy.name}, "
        f"{'CopRA' if config.copra.enabled else 'plain LoRA'}",
    )
    return out_dir


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
