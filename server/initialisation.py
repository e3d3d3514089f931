"""Round 0: the run's initial adapter, computed once on the server and broadcast.

``init.method=default`` keeps PEFT's seeded adapter. ``lora_ga`` needs the full-weight
gradient of every LoRA base layer, estimated either on the server's calibration sample
(``init.source=server``) or by the clients on their own partitions and averaged here,
weighted by their example counts (``init.source=clients``: one query message per node,
only gradients travel). The construction itself is ``copra_core/init/``; this module
only gathers its input.
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from copra_core.adapters import LORA_A, LORA_B, AdapterState, from_array_record, lora_modules, to_array_record
from copra_core.config import RunConfig
from copra_core.diagnostics import normalised_weights
from copra_core.init import initialiser
from copra_core.learner import ModelBundle, calibration_gradients

log = logging.getLogger(__name__)


def initial_adapter(
    grid: Grid, config: RunConfig, bundle: ModelBundle, state: AdapterState
) -> tuple[AdapterState, AdapterState, dict[str, float]]:
    """(initial adapter as the clients receive it, initialisation offsets, ``init/*`` metrics).

    The offsets are computed here, once, from the factors after the transport dtype's
    rounding, and broadcast as bytes: no client recomputes them, so every base is identical.
    """
    method = initialiser(config.init.method)
    method.check(state)
    if not method.needs_gradients:
        return method.initial_state(state, None, config.init), {}, {}
    started = time.perf_counter()
    if config.init.source == "server":
        batch_size = config.init.batch_size or config.train.batch_size
        examples = bundle.task.calibration_examples(config.init.calibration_batches * batch_size)
        gradients = calibration_gradients(bundle, config, state, examples, seed=config.seed)
        clients = 0
    else:
        gradients, clients = client_gradients(grid, config, state)
    estimated = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the randomised SVD (large weights) draws from it
        new_state = method.initial_state(state, gradients, config.init)
    transported = from_array_record(to_array_record(new_state, config.federation.transport_dtype))
    offsets = method.offsets(transported)
    done = time.perf_counter()
    metrics = {
        "init/gradient_s": estimated - started,
        "init/construction_s": done - estimated,
        "init/time_s": done - started,
        "init/clients": float(clients),
    }
    log.info("init %s from %s: %.1fs", config.init.method, config.init.source, metrics["init/time_s"])
    return transported, offsets, metrics


def client_gradients(grid: Grid, config: RunConfig, state: AdapterState) -> tuple[dict[str, torch.Tensor], int]:
    """Example-weighted mean of every connected client's gradient estimate; (gradients, clients)."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: v.contiguous() for k, v in state.items()}),
            "config": ConfigRecord(config.to_flat()),
        }
    )
    nodes = list(grid.get_node_ids())
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=node) for node in nodes]
    # Bounded: a node that never answers must not hang the run (ten times the connect wait;
    # the estimate is a few forward/backward passes).
    replies = list(grid.send_and_receive(messages, timeout=config.federation.wait_for_nodes_s * 10))
    valid = [reply for reply in replies if not reply.has_error()]
    failed = {reply.metadata.src_node_id: reply.error.reason for reply in replies if reply.has_error()}
    if failed:
        log.warning("init: %d node(s) failed to estimate gradients: %s", len(failed), failed)
    if len(valid) < config.federation.min_train_nodes:
        raise RuntimeError(
            f"init.source=clients: {len(valid)} of {len(nodes)} nodes sent a gradient estimate, fewer than "
            f"federation.min-train-nodes={config.federation.min_train_nodes} (failures: {failed})"
        )
    # A fixed order (by partition), so the sum is reproducible whatever order replies arrive in.
    valid.sort(key=lambda m: m.content.metric_records["metrics"]["partition-id"])
    weights = normalised_weights([int(m.content.metric_records["metrics"]["num-examples"]) for m in valid])
    expected = {m: (state[m + LORA_B].shape[0], state[m + LORA_A].shape[1]) for m in lora_modules(state)}
    mean: dict[str, torch.Tensor] = {}
    for reply, weight in zip(valid, weights, strict=True):
        gradients = from_array_record(reply.content.array_records["gradients"])
        shapes = {name: tuple(g.shape) for name, g in gradients.items()}
        if shapes != expected:
            raise RuntimeError(
                f"init.source=clients: node {reply.metadata.src_node_id} sent gradients that do not match the "
                f"adapter's modules (missing {sorted(set(expected) - set(shapes))[:3]}, unexpected "
                f"{sorted(set(shapes) - set(expected))[:3]}, or shapes differ)"
            )
        for name, gradient in gradients.items():
            weighted = gradient.double() * weight
            mean[name] = mean[name] + weighted if name in mean else weighted
    return {name: value.float() for name, value in mean.items()}, len(valid)
