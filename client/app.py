"""Flower ClientApp: train and evaluate the global adapter on this node's partition.

The run config arrives inside every message (the server is the single source of truth),
so the same ClientApp serves ``flwr run``, ``copra-fl simulate`` and deployments. The
node's data comes from its node config: a partition (``partition-id``, ``num-partitions``)
of the run's dataset, or its own files (``data-path``, optional ``val-path``). A deployed
node reads only files its own node config names: a path in the run config is refused
(``node_source``); only ``copra-fl simulate``, where one person owns everything, allows it.
"""

from __future__ import annotations

import os
import zlib

from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from copra_core import local_diagnostics, protocol
from copra_core.adapters import AdapterState, from_array_record
from copra_core.allocation.downlink import as_sent, fill_modules
from copra_core.allocation.masking import ClientPlan, client_plan, effective_state
from copra_core.config import SIMULATION_ENV, ConfigError, RunConfig, split_csv
from copra_core.data import DataFileError, NodeFiles
from copra_core.learner import ClientLearner
from copra_core.local_data import LocalDataError
from copra_core.tasks.base import DATA_LABEL_COUNTS, DATA_SKIPPED_ROWS

app = ClientApp()


def _learner(msg: Message, context: Context) -> tuple[ClientLearner, RunConfig, dict]:
    sent = dict(msg.content.config_records[protocol.CONFIG])
    config = RunConfig.from_flat(sent, ignore=protocol.ROUND_KEYS)
    refuse_run_config_paths(config)
    partition_id, num_partitions, node_files = node_source(context)
    return ClientLearner(config, partition_id, num_partitions, node_files), config, sent


def refuse_run_config_paths(config: RunConfig) -> None:
    """Outside ``copra-fl simulate``, refuse a run config naming a local path, before opening anything.

    A deployed node reads only the files its own node config names; otherwise a server
    operator could make it train on, and leak through the adapter, any file on the machine.
    ``copra-fl simulate`` sets ``$COPRA_FL_SIMULATION`` for its nodes (one person owns everything).
    """
    if os.environ.get(SIMULATION_ENV) == "1":
        return
    refused = {"data.dataset": config.data.dataset if config.data.is_path else "", "data.dir": config.data.dir}
    for key, value in refused.items():
        if value:
            raise ConfigError(
                f"Config key '{key}': the run config names a local path ('{value}'); a deployed node reads only "
                f"the files its own node config names ({protocol.DATA_PATH}, {protocol.VAL_PATH}). Not read."
            )


def node_source(context: Context) -> tuple[int, int, NodeFiles | None]:
    """(partition id, partition count, own files) of this node, from its node config.

    A node with ``data-path`` trains on it; its id is its ``partition-id`` if given, else a
    CRC32 of its ``node-name`` (or of Flower's node id): stable seeds and metrics rows
    without a partition.
    """
    node = context.node_config
    if protocol.DATA_PATH not in node:
        return int(node[protocol.PARTITION_ID]), int(node[protocol.NUM_PARTITIONS]), None
    files = NodeFiles(str(node[protocol.DATA_PATH]), str(node.get(protocol.VAL_PATH, "")))
    if protocol.PARTITION_ID in node:
        return int(node[protocol.PARTITION_ID]), int(node.get(protocol.NUM_PARTITIONS, 1)), files
    name = str(node.get(protocol.NODE_NAME, context.node_id))
    return zlib.crc32(name.encode()) & 0x7FFFFFFF, 1, files


def _global_adapter(msg: Message, learner: ClientLearner, config: RunConfig) -> AdapterState:
    """The server's adapter: the message's arrays plus the modules it left out at their seeded value."""
    received = protocol.read_arrays(msg)
    omitted = protocol.read_omitted(msg)
    if omitted is None:
        return received
    seeded = as_sent(learner.bundle.initial_state(), config.federation.transport_dtype)
    return fill_modules(received, seeded, *omitted)


def _plan(msg: Message, context: Context, config: RunConfig) -> ClientPlan | None:
    """The modules and rank this node trains (allocation on), from the server's record and the node config."""
    allocation = protocol.read_allocation(msg)
    if allocation is None:
        return None
    node = dict(context.node_config)
    partition_id = node_source(context)[0]
    # Simulation has no per-node config beyond the partition: the run config can give one per partition.
    for key, values in (
        (protocol.NODE_RANK, config.allocation.client_ranks),
        (protocol.NODE_BUDGET, config.allocation.client_budgets),
    ):
        if key not in node and split_csv(values):
            node[key] = split_csv(values)[partition_id]
    modules, ranking = allocation
    return client_plan(modules, ranking, node, config.lora.r)


def _identity(learner: ClientLearner) -> dict[str, int]:
    """What every train and query reply reports: the partition and its example count (the weight)."""
    return {protocol.PARTITION_ID: learner.partition_id, protocol.NUM_EXAMPLES: learner.num_train_examples}


@app.train()
def train(msg: Message, context: Context) -> Message:
    learner, config, sent = _learner(msg, context)
    state = _global_adapter(msg, learner, config)
    offsets = protocol.read_offsets(msg)
    plan = _plan(msg, context, config)
    server_round, num_rounds = int(sent[protocol.SERVER_ROUND]), int(sent[protocol.NUM_ROUNDS])
    new_state, metrics = learner.fit(state, server_round, num_rounds, offsets, plan)
    if offsets:
        metrics[protocol.BASE_CRC32] = learner.base_checksum()  # the server checks every client's base is the same
    arrays = protocol.adapter_record(new_state, config.federation.transport_dtype)
    if _local_diagnostics(config):
        # Kept for this round's evaluate message (client-side diagnostics): the adapter as the
        # server decodes it, whole (a partial reply completed with the global adapter it started from).
        sent_state = from_array_record(arrays)
        kept = effective_state(sent_state, state) if plan is not None else sent_state
        weight = float(learner.num_train_examples)
        trained = local_diagnostics.TrainedAdapter(server_round, kept, offsets, weight, config.fingerprint())
        local_diagnostics.keep(context.state, trained)
    # Own data: this node's skipped bad rows land per client in metrics.jsonl.
    own = {k: v for k, v in learner.data_summary.items() if k == DATA_SKIPPED_ROWS}
    return protocol.reply(msg, {**metrics, **own, **_identity(learner)}, {protocol.ARRAYS: arrays})


def _local_diagnostics(config: RunConfig) -> bool:
    """Whether this run measures the diagnostics on the clients (``diagnostics.where``)."""
    return config.diagnostics.enabled and config.diagnostics_where() in ("clients", "both")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    learner, config, sent = _learner(msg, context)
    aggregate, offsets = _global_adapter(msg, learner, config), protocol.read_offsets(msg)
    sums = learner.evaluation_sums(aggregate, offsets)
    # The sums travel too: the server pools them into exact metrics of all clients' examples.
    metrics = {
        **learner.bundle.task.summarise(sums),
        **{protocol.SUM_PREFIX + key: value for key, value in sums.items()},
        protocol.NUM_EXAMPLES: len(learner.val_examples),
    }
    if _local_diagnostics(config):
        # The adapter this node trained this round (none if it was not sampled for training)
        # against the aggregate, on its own validation rows: only the losses travel.
        trained = local_diagnostics.take(context.state, int(sent[protocol.SERVER_ROUND]), config.fingerprint())
        if trained is not None:
            metrics |= local_diagnostics.measure_client(
                learner.evaluate,
                trained,
                aggregate,
                offsets,
                config.interpolation_grid(),
                learner.bundle.task.metric,
            )
            metrics[local_diagnostics.PARTITION] = learner.partition_id
    return protocol.reply(msg, metrics)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Round 0 of ``init.source=clients``: this client's gradient estimate for LoRA-GA.

    Only the gradient averaged over a few batches leaves the node, never examples.
    """
    learner, _, _ = _learner(msg, context)
    gradients = learner.gradient_estimate(protocol.read_arrays(msg))
    return protocol.reply(msg, _identity(learner), {protocol.GRADIENTS: protocol.adapter_record(gradients, "float32")})


@app.query(protocol.PROXY_SCORES_ACTION)
def proxy_scores(msg: Message, context: Context) -> Message:
    """HeteroLoRA allocation: this client's zero-cost proxy score of every LoRA module.

    Only one number per module leaves the node.
    """
    learner, config, _ = _learner(msg, context)
    scores, probed = learner.proxy_scores(_global_adapter(msg, learner, config))
    metrics = {**_identity(learner), protocol.PROBED_B: int(probed)}
    return protocol.reply(msg, metrics, {protocol.SCORES: MetricRecord(scores)})


@app.query(protocol.DATA_SUMMARY_ACTION)
def data_summary(msg: Message, context: Context) -> Message:
    """Round 0: this node's data summary, or why its data does not fit the run's schema.

    Only numbers leave the node (rows for training and validation, skipped rows, and, unless
    ``data.share-label-counts=false``, rows per label), or one line naming the problem (a
    missing column, a label outside data.labels, an empty or undecodable file): a reply,
    not an error, so the server can name the node and leave it out.
    """
    partition_id = node_source(context)[0]
    try:
        learner, config, _ = _learner(msg, context)
    except (LocalDataError, DataFileError, ConfigError) as err:
        check = ConfigRecord({protocol.REASON: str(err)})
        return protocol.reply(msg, {protocol.PARTITION_ID: partition_id}, {protocol.DATA_CHECK: check})
    summary = dict(learner.data_summary)
    if not config.data.share_label_counts:
        summary.pop(DATA_LABEL_COUNTS, None)
    return protocol.reply(msg, {**summary, **_identity(learner)})


@app.query(protocol.PARTITION_ACTION)
def partition(msg: Message, context: Context) -> Message:
    """This node's partition id, so the server samples by partition (``server/sampling.py``)."""
    return protocol.reply(msg, {protocol.PARTITION_ID: node_source(context)[0]})
