"""Flower ClientApp: train and evaluate the global adapter on this node's partition.

The run config arrives inside every message (the server is the single source of truth),
so the same ClientApp serves ``flwr run``, ``copra-fl simulate`` and deployments. The
node's partition comes from its node config (``partition-id``, ``num-partitions``).
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from copra_core.adapters import AdapterState, from_array_record, to_array_record
from copra_core.allocation.downlink import RECORD_KEY as OMITTED_KEY
from copra_core.allocation.downlink import as_sent, fill_modules
from copra_core.allocation.masking import NODE_BUDGET_KEY, NODE_RANK_KEY, ClientPlan, client_plan
from copra_core.allocation.masking import RECORD_KEY as ALLOCATION_KEY
from copra_core.base_offset import RECORD_KEY as OFFSETS_KEY
from copra_core.config import RunConfig, split_csv
from copra_core.learner import ClientLearner
from copra_core.training import SUM_PREFIX

app = ClientApp()

#: Keys the server adds to the run config in train messages (FedAvg adds server-round).
ROUND_KEYS = ("server-round", "num-rounds")


def _learner(msg: Message, context: Context) -> tuple[ClientLearner, RunConfig, dict]:
    sent = dict(msg.content.config_records["config"])
    config = RunConfig.from_flat(sent, ignore=ROUND_KEYS)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    return ClientLearner(config, partition_id, num_partitions), config, sent


def _global_adapter(msg: Message, learner: ClientLearner, config: RunConfig) -> AdapterState:
    """The server's adapter: the message's arrays plus the modules it left out at their seeded value."""
    received = from_array_record(msg.content.array_records["arrays"])
    if OMITTED_KEY not in msg.content.config_records:
        return received
    record = msg.content.config_records[OMITTED_KEY]
    seeded = as_sent(learner.bundle.initial_state(), config.federation.transport_dtype)
    return fill_modules(received, seeded, list(record["modules"]), int(record["crc32"]))


def _base_offset(msg: Message) -> dict:
    """Base-weight offsets sent with the adapter (only by strategies that keep them)."""
    records = msg.content.array_records
    return from_array_record(records[OFFSETS_KEY]) if OFFSETS_KEY in records else {}


def _plan(msg: Message, context: Context, config: RunConfig) -> ClientPlan | None:
    """The modules and rank this node trains (allocation on), from the server's record and the node config."""
    if ALLOCATION_KEY not in msg.content.config_records:
        return None
    record = msg.content.config_records[ALLOCATION_KEY]
    node = dict(context.node_config)
    partition_id = int(node["partition-id"])
    # Simulation has no per-node config beyond the partition: the run config can give one per partition.
    for key, values in (
        (NODE_RANK_KEY, config.allocation.client_ranks),
        (NODE_BUDGET_KEY, config.allocation.client_budgets),
    ):
        if key not in node and split_csv(values):
            node[key] = split_csv(values)[partition_id]
    return client_plan(list(record["modules"]), list(record["ranking"]), node, config.lora.r)


@app.train()
def train(msg: Message, context: Context) -> Message:
    learner, config, sent = _learner(msg, context)
    state = _global_adapter(msg, learner, config)
    offsets = _base_offset(msg)
    plan = _plan(msg, context, config)
    new_state, metrics = learner.fit(state, int(sent["server-round"]), int(sent["num-rounds"]), offsets, plan)
    if offsets:
        metrics["base-crc32"] = learner.base_checksum()  # the server checks every client's base is the same
    reply = RecordDict(
        {
            "arrays": to_array_record(new_state, config.federation.transport_dtype),
            "metrics": MetricRecord(
                {
                    **metrics,
                    "partition-id": learner.partition_id,
                    "num-examples": learner.num_train_examples,
                }
            ),
        }
    )
    return Message(content=reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    learner, config, _ = _learner(msg, context)
    sums = learner.evaluation_sums(_global_adapter(msg, learner, config), _base_offset(msg))
    # The sums travel too: the server pools them into exact metrics of all clients' examples.
    metrics = MetricRecord(
        {
            **learner.bundle.task.summarise(sums),
            **{SUM_PREFIX + key: value for key, value in sums.items()},
            "num-examples": len(learner.val_examples),
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Round 0 of ``init.source=clients``: this client's gradient estimate for LoRA-GA.

    Only the gradient averaged over a few batches leaves the node, never examples.
    """
    learner, _, _ = _learner(msg, context)
    state = from_array_record(msg.content.array_records["arrays"])
    gradients = learner.gradient_estimate(state)
    metrics = MetricRecord({"partition-id": learner.partition_id, "num-examples": learner.num_train_examples})
    return Message(
        content=RecordDict({"gradients": to_array_record(gradients, "float32"), "metrics": metrics}), reply_to=msg
    )


@app.query("proxy_scores")
def proxy_scores(msg: Message, context: Context) -> Message:
    """HeteroLoRA allocation: this client's zero-cost proxy score of every LoRA module.

    Only one number per module leaves the node.
    """
    learner, config, _ = _learner(msg, context)
    scores, probed = learner.proxy_scores(_global_adapter(msg, learner, config))
    metrics = {
        "partition-id": learner.partition_id,
        "num-examples": learner.num_train_examples,
        "probed-b": int(probed),
    }
    return Message(content=RecordDict({"scores": MetricRecord(scores), "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query("partition")
def partition(msg: Message, context: Context) -> Message:
    """This node's partition id, so the server samples by partition (``server/sampling.py``)."""
    metrics = MetricRecord({"partition-id": int(context.node_config["partition-id"])})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
