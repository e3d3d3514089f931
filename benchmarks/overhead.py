"""Framework overhead: steady-state Flower round time / a bare PEFT loop doing the same steps.

Both sides train the same model (plain LoRA, so both do identical work per step) on the
same batches: K clients x S local steps per round. The bare loop runs them one after the
other in this process; the federation runs them through Flower's simulation engine
(Ray actors, messages, serialisation, aggregation). Printed ratios:

* train ratio: median ``time/train_s`` (send -> local training -> receive -> aggregate)
  over rounds >= 2, divided by the bare loop's time for K x S steps. Target <= 1.15.
* round ratio with the diagnostics and federated evaluation off (the server's evaluation
  of the global adapter on the dev set stays), and with everything on, same divisor, to
  show what the per-round barrier measurements cost.

Usage: python -m benchmarks.overhead [--clients 4] [--steps 25] [--rounds 4] [--layers 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from copra_core.adapters import set_adapter_state
from copra_core.config import RunConfig
from copra_core.learner import ClientLearner
from simulations.runner import simulate


def bare_peft_loop(config: RunConfig) -> float:
    """K x S AdamW steps with the PEFT model and nothing else; returns seconds."""
    learners = [ClientLearner(config, pid, config.federation.clients) for pid in range(config.federation.clients)]
    model = learners[0].bundle.model
    task = learners[0].bundle.task
    initial = learners[0].bundle.initial_state()
    batches = [list(learner.round_batches(1)) for learner in learners]
    model.train()
    started = time.perf_counter()
    for client_batches in batches:
        set_adapter_state(model, initial)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.train.lr)
        for batch in client_batches:
            loss, _ = task.batch_stats(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def federation_rows(config: RunConfig, out: Path) -> list[dict]:
    config.out_dir = str(out)
    simulate(config)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--layers", type=int, default=0, help="truncate the model (0 = all 6 blocks)")
    args = parser.parse_args()

    config = RunConfig()
    config.update(
        {
            "federation.clients": args.clients,
            "federation.rounds": args.rounds,
            "train.local-steps": args.steps,
            "model.num-hidden-layers": args.layers,
            "copra.enabled": False,
            "train.lr-schedule": "constant",
        }
    )
    bare = bare_peft_loop(config)
    lean = RunConfig.from_flat(config.to_flat())
    lean.update({"diagnostics.enabled": False, "federation.fraction-evaluate": 0.0})
    with tempfile.TemporaryDirectory(prefix="copra-overhead-") as tmp:
        rows = federation_rows(config, Path(tmp) / "default")
        lean_rows = federation_rows(lean, Path(tmp) / "lean")
    steady = [r for r in rows if r["round"] >= 2]
    train_s = statistics.median(r["time/train_s"] for r in steady)
    round_s = statistics.median(r["time/round_s"] for r in steady)
    diag_s = statistics.median(r.get("time/diagnostics_s", 0.0) for r in steady)
    lean_round_s = statistics.median(r["time/round_s"] for r in lean_rows if r["round"] >= 2)
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads: {torch.get_num_threads()}")
    print(f"setting: {args.clients} clients x {args.steps} local steps, {args.rounds} rounds, plain LoRA")
    print(f"bare PEFT loop ({args.clients} x {args.steps} steps): {bare:.2f} s")
    print(f"federated round, train part (median of rounds >= 2): {train_s:.2f} s")
    print(f"federated round, whole with diagnostics + evaluation: {round_s:.2f} s (diagnostics {diag_s:.2f} s)")
    print(f"federated round, diagnostics and federated evaluation off: {lean_round_s:.2f} s")
    print(f"train ratio (target <= 1.15): {train_s / bare:.3f}")
    print(f"round ratio, diagnostics off (server evaluation of the dev set kept): {lean_round_s / bare:.3f}")
    print(f"round ratio incl. diagnostics and evaluation: {round_s / bare:.3f}")


if __name__ == "__main__":
    main()
