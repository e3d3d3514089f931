"""Causal-LM instruction tuning: federated CopRA vs plain LoRA on Dolly-15k's FedIT split.

Both methods run through ``copra-fl simulate``'s code (Flower simulation, the same
ServerApp/ClientApp) with the same seed, the same clients sampled per round (by partition,
``server/sampling.py``), initial adapter, steps and linear averaging; ``copra.enabled`` is
the only difference. Per method:

* held-out loss and perplexity per round (the 80-record global test split);
* the Jensen gap of the aggregate (factor and product space) and the pairwise
  interpolation barrier per round, measured by the run's diagnostics on a fixed sample;
* pruning robustness of the final global adapter: held-out loss with the LoRA adapters of
  every other block, or of the last half of the blocks, removed (``copra_core/pruning.py``);
* ROUGE-L of greedy generations on fixed test prompts after round 1 and the last round.

Runs are kept under ``--work`` (one folder per method: metrics, report, adapter; a rerun
reuses a finished run). Writes ``causal_lm.md``, ``causal_lm.json`` and PNG plots to ``--out``.

Usage: python -m benchmarks.causal_lm [--quick] [--full] [--seed 0] [--reuse-copra RUN_DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

from safetensors.torch import load_file

from copra_core.checkpoint import config_differences
from copra_core.config import RunConfig, read_config_json
from copra_core.evaluator import ServerEvaluator
from copra_core.learner import model_bundle
from copra_core.lora import find_block_list
from copra_core.pruning import every_other_block, last_half, pruned_state
from copra_core.reporting import atomic_write_text, plt, read_metrics
from copra_core.tasks import instruct_data
from simulations.runner import simulate
from simulations.scenarios import SCENARIOS

METHODS = {"copra": True, "lora": False}
#: This machine (2 CPU cores): exactly the ``copra-fl simulate --task causal_lm`` demo
#: (3 rounds, 2 of the 10 FedIT clients per round), so a finished demo run with the same
#: seed can stand in for the CopRA run (``--reuse-copra``; its config.json is compared).
CPU: dict[str, object] = {**SCENARIOS["causal_lm"]}
#: A smoke run of the pipeline (2-block model, tiny samples): checks the code, not the claims.
QUICK: dict[str, object] = {**SCENARIOS["causal_lm-quick"]}
#: The full-size setting for a GPU (FedIT/FLoRA-like: every client every round, ~1 epoch of
#: local training per round at 512 tokens, the whole test split for every measurement).
FULL: dict[str, object] = {
    **SCENARIOS["causal_lm"],
    "device": "cuda",
    "model.max-length": 512,
    "federation.rounds": 3,
    "federation.fraction-train": 1.0,
    "federation.min-train-nodes": 10,
    "federation.client-gpus": 0.2,
    "train.local-steps": 170,
    "train.batch-size": 8,
    "train.lr": 3e-4,
    "diagnostics.sample-size": 80,
    "diagnostics.pairs": 5,
    "diagnostics.grid": "0,0.25,0.5,0.75,1",
    "causal-lm.min-response-tokens": 128,
    "causal-lm.generation-prompts": 80,
    "causal-lm.max-new-tokens": 256,
}
PRUNING = {"none": lambda n: set(), "every_other": every_other_block, "last_half": last_half}


def run_config(method: str, settings: dict[str, object], seed: int, out: Path) -> RunConfig:
    config = RunConfig.from_flat({**settings, "seed": seed, "copra.enabled": METHODS[method]})
    config.out_dir = str(out)
    return config


#: Keys a reused run may differ in: where it was written and how its out-dir was prepared.
REUSE_FREE_KEYS = frozenset({"out-dir", "federation.overwrite"})


def finished_run_matches(run_dir: Path, config: RunConfig) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly ``config`` (the output folder aside).

    A different configuration is an error, not a silent reuse or overwrite.
    """
    if not ((run_dir / "report.md").is_file() and (run_dir / "adapter" / "adapter_model.safetensors").is_file()):
        return False
    differ = config_differences(read_config_json(run_dir / "config.json"), config.to_flat(), ignore=REUSE_FREE_KEYS)
    if differ:
        raise ValueError(f"{run_dir} holds a run of another configuration (differs in {differ}); remove it")
    return True


def run_method(method: str, settings: dict[str, object], seed: int, work: Path) -> Path:
    """One federation (or the finished one in ``work``); returns its run folder."""
    out = work / method
    config = run_config(method, settings, seed, out)
    if finished_run_matches(out, config):
        return out
    config.federation.overwrite = True  # what an interrupted run left in ``out`` is replaced
    started = time.perf_counter()
    simulate(config, observers=[lambda row: None])
    atomic_write_text(out / "seconds.txt", f"{time.perf_counter() - started:.1f}\n")
    return out


def pruning_losses(run_dir: Path, settings: dict[str, object], seed: int) -> dict[str, dict[str, float]]:
    """Held-out loss, perplexity and token accuracy of the run's final adapter, pruned by each pattern.

    Cached in the run folder (``pruning.json``): a rerun of the benchmark only rewrites the report.
    """
    cache = run_dir / "pruning.json"
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    config = RunConfig.from_flat({**settings, "seed": seed})
    bundle = model_bundle(config)
    task = bundle.task
    evaluator = ServerEvaluator(bundle, task.server_examples(config.data.eval_size), config.diagnostics.batch_size)
    state = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    prefix, blocks = find_block_list(bundle.model)
    result = {
        name: evaluator.factor(pruned_state(state, remove(len(blocks)), prefix)) for name, remove in PRUNING.items()
    }
    atomic_write_text(cache, json.dumps(result))
    return result


def summarise(method: str, run_dir: Path, pruning: dict) -> dict:
    rows = read_metrics(run_dir / "metrics.jsonl")
    generations = json.loads((run_dir / "generations.json").read_text(encoding="utf-8"))

    def series(key: str) -> list[float | None]:
        return [row.get(key) for row in rows]

    return {
        "method": method,
        "seconds": float((run_dir / "seconds.txt").read_text()) if (run_dir / "seconds.txt").is_file() else None,
        "rounds": [row["round"] for row in rows],
        "loss": series("global/loss"),
        "perplexity": series("global/perplexity"),
        "token_accuracy": series("global/token_accuracy"),
        "jensen_factor": series("barrier/jensen_factor"),
        "jensen_product": series("barrier/jensen_product"),
        "pairwise_max": series("barrier/pairwise_max"),
        "pairwise_max_product": series("barrier/pairwise_max_product"),
        "exactness_error": series("aggregation/exactness_error"),
        "clients_mean_loss": series("clients/mean_loss"),
        "round_s": series("time/round_s"),
        "train_s": series("time/train_s"),
        "diagnostics_s": series("time/diagnostics_s"),
        # Partition ids of the clients Flower sampled (node ids are random per run, so the
        # methods' samples differ even with the same seed).
        "sampled": [[c["partition-id"] for c in row.get("clients", [])] for row in rows],
        "rougeL": {r: v["rougeL"] for r, v in generations["rounds"].items()},
        "pruning": pruning,
    }


def check_export(run_dir: Path) -> dict[str, object]:
    """Reload a run's exported adapter as a user would and compare with what the run recorded.

    ``PeftModel.from_pretrained`` on the dequantised base model: greedy answers to the fixed
    prompts must equal the run's last generating round, and the held-out loss must equal the
    last round's ``global/loss``.
    """
    import torch
    from peft import PeftModel

    from copra_core.tasks import build_task
    from copra_core.training import evaluate

    config = RunConfig.from_flat(read_config_json(run_dir / "config.json"))
    task = build_task(config)
    base, _ = task.load_model()
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    saved = json.loads((run_dir / "generations.json").read_text(encoding="utf-8"))
    last = max(saved["rounds"], key=int)
    answers = task.generate(model, task.generation_set())
    rows = read_metrics(run_dir / "metrics.jsonl")
    batches = task.eval_batches(task.server_examples(config.data.eval_size), config.diagnostics.batch_size)
    loss = evaluate(model, task, batches, torch.device("cpu"))["loss"]
    return {
        "round": int(last),
        "same_text": answers == saved["rounds"][last]["answers"],
        "answers_equal": sum(a == b for a, b in zip(answers, saved["rounds"][last]["answers"], strict=True)),
        "answers": len(answers),
        "loss_reloaded": loss,
        "loss_in_run": rows[-1]["global/loss"],
    }


# ---------------------------------------------------------------------- plots and markdown
def plot(results: dict[str, dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for method, res in results.items():
        axes[0].plot(res["rounds"], res["loss"], "o-", label=method)
        rounds = res["rounds"][1:]
        axes[1].plot(rounds, res["jensen_factor"][1:], "o-", label=f"{method}: Jensen gap (factor)")
        axes[1].plot(rounds, res["pairwise_max"][1:], "s--", label=f"{method}: pairwise barrier (max)")
    axes[0].set(xlabel="round", ylabel="held-out loss (nats / response token)", title="Global adapter")
    axes[1].axhline(0.0, color="grey", lw=0.8)
    axes[1].set(xlabel="round", ylabel="loss above the clients' (nats)", title="Averaging barriers")
    names = [n for n in PRUNING if n != "none"]
    width = 0.8 / len(results)
    for k, (method, res) in enumerate(results.items()):
        xs = [i + k * width for i in range(len(names))]
        unpruned = res["pruning"]["none"]["loss"]
        axes[2].bar(xs, [res["pruning"][n]["loss"] - unpruned for n in names], width, label=method)
    axes[2].set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(names))], names)
    axes[2].set(ylabel="held-out loss increase (nats)", title="Final adapter, block adapters removed")
    for ax in axes[:2]:
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.{digits}f}"


def _p(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def write_markdown(results: dict[str, dict], settings: dict, command: str, seed: int, path: Path) -> None:
    methods = list(results)
    first = results[methods[0]]
    eval_size = settings.get("data.eval-size") or len(instruct_data.test_split(RunConfig.from_flat(settings).data))
    lines = [
        "# Causal-LM instruction tuning: federated CopRA vs LoRA (Dolly-15k, FedIT split)",
        "",
        f"Command: `{command}` (seed {seed}; one seed: the numbers carry no error bars). "
        "Both methods: the same initial adapter, steps, schedule and linear averaging; `copra.enabled` is "
        "the only setting that differs. "
        + (
            "Both runs trained the same clients in every round (nodes are drawn by partition with a "
            "seeded draw per round, `server/sampling.py`; listed below). "
            if all(results[m]["sampled"] == first["sampled"] for m in methods)
            else "**The sampled clients differ between the runs** (listed below): that confounds the comparison. "
        )
        + "Settings: "
        + ", ".join(f"`{k}={v}`" for k, v in settings.items() if k not in ("task",))
        + ".",
        "",
        "Run time on this machine: "
        + ", ".join(
            f"{m} {_p(results[m]['seconds'] / 60, 1)} min"
            if results[m]["seconds"]
            else f"{m}: a reused run (`--reuse-copra`; timed by the command that made it)"
            for m in methods
        )
        + " (wall-clock of each federation, including Ray and model start-up).",
        "",
        f"## Held-out loss per round ({eval_size} records of the global test split)",
        "",
        "| round | " + " | ".join(f"{m} loss | {m} ppl" for m in methods) + " |",
        "|---|" + "---|---|" * len(methods),
    ]
    for i, rnd in enumerate(first["rounds"]):
        cells = [f"{_p(results[m]['loss'][i])} | {_p(results[m]['perplexity'][i], 2)}" for m in methods]
        lines.append(f"| {rnd} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Clients (partition ids, i.e. FedIT `client_N`) sampled per round: "
        + "; ".join(
            f"{m} " + ", ".join(f"round {i}: {ids}" for i, ids in enumerate(results[m]["sampled"]) if ids)
            for m in methods
        )
        + ".",
        "",
        "## Averaging diagnostics per round",
        "",
        "Jensen gap = loss of the averaged adapter minus the example-weighted mean of the sampled clients' "
        "losses (diagnostic sample); pairwise barrier = worst loss bump above the chord between two clients' "
        "adapters. Positive = averaging costs loss.",
        "",
        "| round | "
        + " | ".join(f"{m} Jensen (factor) | {m} Jensen (product) | {m} pair barrier" for m in methods)
        + " |",
        "|---|" + "---|---|---|" * len(methods),
    ]
    for i, rnd in enumerate(first["rounds"][1:], start=1):
        cells = [
            f"{_f(results[m]['jensen_factor'][i])} | {_f(results[m]['jensen_product'][i])} | "
            f"{_f(results[m]['pairwise_max'][i])}"
            for m in methods
        ]
        lines.append(f"| {rnd} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Pruning robustness of the final global adapter",
        "",
        "Held-out loss with the LoRA adapters of some blocks removed (B A = 0: the block computes its "
        "pre-trained weights, as a block CopRA dropped). Increase = loss minus the unpruned adapter's.",
        "",
        "| removed | " + " | ".join(f"{m} loss | {m} increase | {m} token acc." for m in methods) + " |",
        "|---|" + "---|---|---|" * len(methods),
    ]
    for name in PRUNING:
        cells = []
        for m in methods:
            pr = results[m]["pruning"]
            cells.append(
                f"{_p(pr[name]['loss'])} | {_f(pr[name]['loss'] - pr['none']['loss'])} | "
                f"{_p(pr[name]['token_accuracy'])}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## ROUGE-L of greedy generations (fixed test prompts)",
        "",
        "| round | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for rnd in sorted(first["rougeL"], key=int):
        lines.append(f"| {rnd} | " + " | ".join(_p(results[m]["rougeL"].get(rnd)) for m in methods) + " |")
    lines += ["", "![causal_lm](causal_lm.png)", ""]
    atomic_write_text(path, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="2-layer model, tiny samples (a pipeline check).")
    parser.add_argument("--full", action="store_true", help="The full-size setting (needs a CUDA GPU).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="Where the results go.")
    parser.add_argument(
        "--work", type=Path, default=Path("runs/bench_causal_lm"), help="Run folders (reused when finished)."
    )
    parser.add_argument(
        "--reuse-copra",
        type=Path,
        default=None,
        help="A finished `copra-fl simulate --task causal_lm` run folder to use as the CopRA run "
        "(its config must equal the benchmark's CopRA config; checked).",
    )
    parser.add_argument(
        "--check-export",
        type=Path,
        default=None,
        help="Only reload RUN_DIR's exported adapter with PEFT and compare its generations and loss with the run's.",
    )
    args = parser.parse_args()
    if args.check_export is not None:
        print(json.dumps(check_export(args.check_export), indent=1))
        return
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other")
    settings = QUICK if args.quick else FULL if args.full else CPU
    name = "causal_lm_quick" if args.quick else "causal_lm_full" if args.full else "causal_lm"
    work = args.work / name
    if args.reuse_copra is not None:
        if not finished_run_matches(args.reuse_copra, run_config("copra", settings, args.seed, work / "copra")):
            parser.error(f"--reuse-copra {args.reuse_copra}: not a finished run")
        if not (work / "copra").exists():
            shutil.copytree(args.reuse_copra, work / "copra")
    results = {}
    for method in METHODS:
        run_dir = run_method(method, settings, args.seed, work)
        results[method] = summarise(method, run_dir, pruning_losses(run_dir, settings, args.seed))
        print(
            f"{method}: final loss {results[method]['loss'][-1]:.4f}, ROUGE-L {results[method]['rougeL']}", flush=True
        )
    command = "python -m benchmarks.causal_lm" + (" --quick" if args.quick else " --full" if args.full else "")
    command += f" --seed {args.seed}" if args.seed else ""
    command += f" --reuse-copra {args.reuse_copra}" if args.reuse_copra else ""
    atomic_write_text(args.out / f"{name}.json", json.dumps({"settings": settings, "results": results}, indent=1))
    plot(results, args.out / f"{name}.png")
    write_markdown(results, settings, command, args.seed, args.out / f"{name}.md")
    if name != "causal_lm":  # the markdown links causal_lm.png
        md = args.out / f"{name}.md"
        atomic_write_text(md, md.read_text().replace("(causal_lm.png)", f"({name}.png)"))
    print((args.out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
