"""Flower ClientApp: train and evaluate the global adapter on this node's partition.

The run config arrives inside every message (the server is the single source of truth),
so the same ClientApp serves ``flwr run``, ``copra-fl simulate`` and deployments. The
node's partition comes from its node config (``partition-id``, ``num-partitions``).
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from copra_core import local_diagnostics, protocol
from copra_core.adapters import AdapterState, from_array_record
from copra_core.allocation.downlink import as_sent, fill_modules
from copra_core.allocation.masking import ClientPlan, client_plan, effective_state
from copra_core.config import RunConfig, split_csv
from copra_core.learner import ClientLearner

app = ClientApp()


def _learner(msg: Message, context: Context) -> tuple[ClientLearner, RunConfig, dict]:
    sent = dict(msg.content.config_records[protocol.CONFIG])
    config = RunConfig.from_flat(sent, ignore=protocol.ROUND_KEYS)
    partition_id = int(context.node_config[protocol.PARTITION_ID])
    num_partitions = int(context.node_config[protocol.NUM_PARTITIONS])
    return ClientLearner(config, partition_id, num_partitions), config, sent


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
    partition_id = int(node[protocol.PARTITION_ID])
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
        trained = local_diagnostics.TrainedAdapter(server_round, kept, offsets, float(learner.num_train_examples))
        local_diagnostics.keep(context.state, trained)
    return protocol.reply(msg, {**metrics, **_identity(learner)}, {protocol.ARRAYS: arrays})


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
        trained = local_diagnostics.take(context.state, int(sent[protocol.SERVER_ROUND]))
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


@app.query(protocol.PARTITION_ACTION)
def partition(msg: Message, context: Context) -> Message:
    """This node's partition id, so the server samples by partition (``server/sampling.py``)."""
    return protocol.reply(msg, {protocol.PARTITION_ID: int(context.node_config[protocol.PARTITION_ID])})
