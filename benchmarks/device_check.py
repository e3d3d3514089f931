"""The method path on whatever device is present (CUDA when there is one), without Flower.

Runs the same copra_core pieces the ClientApp and ServerApp use -- ClientLearner.fit
(CopRA masks, AdamW), the linear rule, ServerEvaluator and round_diagnostics, the PEFT
export and reload -- in one process, so it also runs where Flower's Ray engine is not
installed (e.g. a bare GPU node). Prints per-round timings and accuracy as JSON lines.

Usage: python -m benchmarks.device_check [--set key=value ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel

from copra_core.adapters import export_adapter, set_adapter_state
from copra_core.config import RunConfig
from copra_core.diagnostics import round_diagnostics
from copra_core.evaluator import ServerEvaluator
from copra_core.learner import ClientLearner
from strategies.base import ClientUpdate
from strategies.linear import LinearAveraging


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    config = RunConfig()
    config.apply_overrides(args.overrides)
    config.validate()
    k, rounds = config.federation.clients, config.federation.rounds

    learners = [ClientLearner(config, pid, k) for pid in range(k)]
    bundle = learners[0].bundle
    device = bundle.device
    print(json.dumps({"device": str(device), "name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}))
    global_eval = ServerEvaluator(
        bundle, bundle.task.server_examples(config.data.eval_size), config.diagnostics.batch_size
    )
    diag_eval = ServerEvaluator(
        bundle, bundle.task.server_examples(config.diagnostics.sample_size), config.diagnostics.batch_size
    )
    rule = LinearAveraging()
    state = bundle.initial_state()
    for server_round in range(1, rounds + 1):
        _sync()
        started = time.perf_counter()
        updates = []
        for learner in learners:
            new_state, metrics = learner.fit(state, server_round, rounds)
            updates.append(ClientUpdate(learner.partition_id, new_state, learner.num_train_examples, metrics))
        _sync()
        train_s = time.perf_counter() - started
        state = rule.aggregate(updates, state)
        started = time.perf_counter()
        diag, _, _ = round_diagnostics(
            [u.state for u in updates],
            [u.num_examples for u in updates],
            state,
            diag_eval,
            grid=config.interpolation_grid(),
            num_pairs=config.diagnostics.pairs,
            seed=server_round,
        )
        _sync()
        diag_s = time.perf_counter() - started
        result = global_eval.factor(state)
        steps = k * config.train.local_steps
        row = {
            "round": server_round,
            "global/accuracy": result["accuracy"],
            "train_s": train_s,
            "step_ms": 1000 * train_s / steps,
            "diagnostics_s": diag_s,
            "barrier/jensen_factor": diag["barrier/jensen_factor"],
            "aggregation/exactness_error": diag["aggregation/exactness_error"],
        }
        if device.type == "cuda":
            row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(json.dumps(row), flush=True)

    out = args.out or Path(tempfile.mkdtemp(prefix="copra-device-"))
    adapter_dir = export_adapter(bundle.model, state, out / "adapter")
    base, _ = bundle.task.load_model()
    reloaded = PeftModel.from_pretrained(base, str(adapter_dir)).to(device).eval()
    batch = next(bundle.task.eval_batches(bundle.task.server_examples(64), 64))
    inputs = {key: value.to(device) for key, value in batch.items() if key != "labels"}
    set_adapter_state(bundle.model, state)
    bundle.model.eval()
    with torch.no_grad():
        diff = (reloaded(**inputs).logits - bundle.model(**inputs).logits).abs().max().item()
    print(json.dumps({"export_reload_max_logit_diff": diff}))


if __name__ == "__main__":
    main()
