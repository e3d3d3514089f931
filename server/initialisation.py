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
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from copra_core import protocol
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
    content = protocol.query_content(ArrayRecord({k: v.contiguous() for k, v in state.items()}), config.to_flat())
    # Bounded: a node that never answers must not hang the run (ten times the connect wait;
    # the estimate is a few forward/backward passes). By partition: the sum is reproducible.
    replies = protocol.query_nodes(
        grid,
        protocol.QUERY_GRADIENTS,
        content,
        timeout=config.federation.wait_for_nodes_s * 10,
        minimum=config.federation.min_train_nodes,
        purpose="init.source=clients: gradient estimate",
    )
    weights = normalised_weights([protocol.num_examples_of(reply) for reply in replies])
    expected = {m: (state[m + LORA_B].shape[0], state[m + LORA_A].shape[1]) for m in lora_modules(state)}
    mean: dict[str, torch.Tensor] = {}
    for reply, weight in zip(replies, weights, strict=True):
        gradients = protocol.read_arrays(reply, protocol.GRADIENTS)
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
    return {name: value.float() for name, value in mean.items()}, len(replies)
