"""CopRA vs plain LoRA in federation: one-shot merging, pruning, multi-round FL, communication.

Both methods run through the same code (``copra.enabled`` is the only difference), with
the same seeds, partitions, initial adapter and step counts.

1. **One-shot merge** (one round of long local training, the model-merging setting),
   in-process with the clients' own training code (``ClientLearner.fit``) and the
   ``linear`` rule: K clients, SST-2 and AG News, two regimes:

   * ``default``: ``STEPS`` local steps at the base learning rate, Dirichlet alpha = 0.1
     and IID partitions;
   * ``stress``: 8x the steps, 3x the learning rate, Dirichlet alpha = 0.05.

   Per run: every client's and the merged adapter's accuracy, the merge deficit (clients'
   mean accuracy - merged accuracy), Jensen gaps in factor and product space, the pairwise
   loss barrier at alpha = 0.5 and its maximum over the grid, and the accuracies after
   layer pruning (adapters of every other block removed; of the last half removed).
2. **Multi-round FL** through Flower's simulation (SST-2, K clients, R rounds): accuracy
   and barrier figures per round for both methods, plus a centralised plain-LoRA baseline
   trained on the pooled data for the same total number of steps.
3. **Communication**: bytes up and down per client per round, and the same federation
   with fp16 transport (accuracy difference reported).

Every table is mean +- std over seeds. Finished pieces are cached in
``<out>/copra_vs_lora_raw/`` (a rerun resumes). Writes ``copra_vs_lora.md``,
``copra_vs_lora.json`` (``results.json`` content) and PNG plots to ``--out``.

Usage: python -m benchmarks.copra_vs_lora [--quick] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import strategies
from benchmarks.common import cached_runs, comparable_config, mean_std, pm, read_cache
from copra_core.config import RunConfig
from copra_core.diagnostics import round_diagnostics
from copra_core.evaluator import ServerEvaluator
from copra_core.learner import ClientLearner, model_bundle
from copra_core.lora import find_block_list
from copra_core.pruning import every_other_block, last_half, pruned_state
from copra_core.reporting import atomic_write_text, plt
from strategies.base import ClientUpdate

#: Shared by every part: the full 6-layer default model on short sequences, K = 4.
#: Sized for the issue's 45-minute budget on a 2-core CPU. The first setting (16 steps,
#: 200 evaluation and 64 diagnostic examples, 32 tokens everywhere) took 55 min on the
#: faster machine and about 70 min on the slower one; runtime is matrix products, so
#: the shrink is in sample sizes, steps and AG News tokens, the same for both methods.
BASE: dict[str, object] = {
    "federation.clients": 4,
    "model.max-length": 32,
    "train.batch-size": 16,
    "train.lr": 5e-3,
    "train.lr-schedule": "constant",
    "data.eval-size": 128,
    "data.val-max": 16,
    "diagnostics.sample-size": 32,
    "diagnostics.grid": "0,0.25,0.5,0.75,1",
    "diagnostics.pairs": 1,
}
#: AG News articles run past any short limit and cost the most: their first 24 tokens
#: (title and lead) keep the runtime in budget. SST-2 sentences mostly fit in 32.
DATASET_OVERRIDES: dict[str, dict[str, object]] = {"ag_news": {"model.max-length": 24}}
STEPS = 12
ONE_SHOT: dict[str, dict[str, object]] = {
    "default/dirichlet0.1": {"train.local-steps": STEPS, "data.partition": "dirichlet", "data.dirichlet-alpha": 0.1},
    "default/iid": {"train.local-steps": STEPS, "data.partition": "iid"},
    "stress/dirichlet0.05": {
        "train.local-steps": 8 * STEPS,
        "train.lr": 3 * 5e-3,
        "data.partition": "dirichlet",
        "data.dirichlet-alpha": 0.05,
    },
}
#: ``--investigate``: SST-2 regimes probing why the targets are (not) met. In the stress
#: regime every client collapses to one class (accuracy at chance), so its barriers say
#: nothing. A first probe (alpha 0.3, 8x steps, 3x lr) collapsed the same way, which
#: points at the 3x learning rate rather than the partition: these probes keep the 8x
#: steps at the base learning rate, for the stress partition and a milder one. Both
#: methods, like everything else.
PROBES: dict[str, dict[str, object]] = {
    "probe/dirichlet0.05-x8-lr1x": {
        "train.local-steps": 8 * STEPS,
        "data.partition": "dirichlet",
        "data.dirichlet-alpha": 0.05,
    },
    "probe/dirichlet0.3-x8-lr1x": {
        "train.local-steps": 8 * STEPS,
        "data.partition": "dirichlet",
        "data.dirichlet-alpha": 0.3,
    },
}
REGIMES = ONE_SHOT | PROBES
DATASETS = ("sst2", "ag_news")
MULTI_ROUND: dict[str, object] = {
    "data.dataset": "sst2",
    "federation.rounds": 5,
    "train.local-steps": 10,
    "data.partition": "dirichlet",
    "data.dirichlet-alpha": 0.5,
    "federation.fraction-evaluate": 0.0,
}
QUICK: dict[str, object] = {"model.num-hidden-layers": 2, "data.eval-size": 100, "diagnostics.sample-size": 32}
METHODS = {"copra": True, "lora": False}


# ---------------------------------------------------------------------- metric functions
def barrier_at(curve: list[float], alphas: list[float], alpha: float) -> float:
    """Loss on the path at ``alpha`` minus the straight line between the end points.

    ``curve[k]`` is the loss at ``alphas[k] * theta_i + (1 - alphas[k]) * theta_j``, so the
    end point at alpha = 1 is client i and at alpha = 0 client j.
    """
    k = alphas.index(alpha)
    end_i, end_j = curve[alphas.index(1.0)], curve[alphas.index(0.0)]
    return curve[k] - (alpha * end_i + (1 - alpha) * end_j)


def merge_deficit(client_accuracies: list[float], weights: list[float], merged_accuracy: float) -> float:
    """Example-weighted mean client accuracy minus the merged adapter's (> 0: merging lost accuracy)."""
    return sum(w * a for w, a in zip(weights, client_accuracies, strict=True)) / sum(weights) - merged_accuracy


# ---------------------------------------------------------------------- part 1: one-shot merge
def one_shot(
    dataset: str, regime: str, method: str, seed: int, overrides: dict, raw_dir: Path, check_config: bool = True
) -> dict:
    cache = raw_dir / f"oneshot-{dataset}-{regime.replace('/', '-')}-{method}-seed{seed}.json"
    config = RunConfig.from_flat(
        {
            **BASE,
            **DATASET_OVERRIDES.get(dataset, {}),
            **REGIMES[regime],
            **overrides,
            "data.dataset": dataset,
            "seed": seed,
            "copra.enabled": METHODS[method],
            "federation.rounds": 1,
        }
    )
    cached = read_cache(cache, config, check_config)
    if cached is not None:
        return cached
    started = time.perf_counter()
    bundle = model_bundle(config)
    initial = bundle.initial_state()
    bundle.base_offsets.apply(bundle.model, {})
    learners = [ClientLearner(config, pid, config.federation.clients) for pid in range(config.federation.clients)]
    states = [learner.fit(initial, 1, 1)[0] for learner in learners]
    counts = [learner.num_train_examples for learner in learners]
    updates = [
        ClientUpdate(node_id=i, state=s, num_examples=n) for i, (s, n) in enumerate(zip(states, counts, strict=True))
    ]
    merged = strategies.build("linear", "").aggregate(updates, initial)
    train_s = time.perf_counter() - started

    task = bundle.task
    evaluator = ServerEvaluator(bundle, task.server_examples(config.data.eval_size), config.diagnostics.batch_size)
    diag_eval = ServerEvaluator(
        bundle, task.server_examples(config.diagnostics.sample_size), config.diagnostics.batch_size
    )
    grid = config.interpolation_grid()
    diag, _, curves = round_diagnostics(states, counts, merged, diag_eval, grid=grid, num_pairs=1, seed=seed)
    prefix, blocks = find_block_list(bundle.model)
    patterns = {"full": set(), "every_other": every_other_block(len(blocks)), "last_half": last_half(len(blocks))}
    accuracy: dict[str, dict[str, object]] = {}
    for name, remove in patterns.items():  # "full" removes nothing: pruned_state returns a copy
        clients = [evaluator.factor(pruned_state(s, remove, prefix))[task.metric] for s in states]
        accuracy[name] = {
            "clients": clients,
            "merged": evaluator.factor(pruned_state(merged, remove, prefix))[task.metric],
        }
    curve = curves[0]
    result = {
        "dataset": dataset,
        "regime": regime,
        "method": method,
        "seed": seed,
        "config": comparable_config(config),
        "train_s": train_s,
        "seconds": time.perf_counter() - started,
        "weights": counts,
        "accuracy": accuracy,
        "merge_deficit": merge_deficit(accuracy["full"]["clients"], counts, accuracy["full"]["merged"]),
        "jensen_factor": diag["barrier/jensen_factor"],
        "jensen_product": diag["barrier/jensen_product"],
        "barrier_half": barrier_at(curve.loss_factor, curve.alphas, 0.5),
        "barrier_half_product": barrier_at(curve.loss_product, curve.alphas, 0.5),
        "barrier_max": diag["barrier/pairwise_max"],
        "exactness_error": diag["aggregation/exactness_error"],
        "curve": {
            "pair": list(curve.pair),
            "alphas": curve.alphas,
            "loss_factor": curve.loss_factor,
            "loss_product": curve.loss_product,
            "accuracy_factor": curve.metric_factor,
        },
    }
    atomic_write_text(cache, json.dumps(result))
    return result


# ---------------------------------------------------------------------- part 2 and 3: multi-round FL
#: The multi-round rows keep these keys (and every barrier figure).
ROUND_KEYS = {"round", "global/accuracy", "global/loss", "comm/bytes_up", "comm/bytes_down", "clients/sampled"}


def multi_round_job(
    method: str, seed: int, transport: str, overrides: dict, raw_dir: Path
) -> tuple[RunConfig, Path, dict[str, object]]:
    """One multi-round federation as a ``cached_runs`` job: (config, cache file, labels)."""
    # The float16 runs measure what fp16 transport costs in accuracy and saves in bytes; the
    # barrier figures come from the float32 runs, so the fp16 runs skip the diagnostics
    # (about half of a multi-round run's time).
    config = RunConfig.from_flat(
        {**BASE, **MULTI_ROUND, **overrides, "seed": seed, "copra.enabled": METHODS[method]}
        | {"federation.transport-dtype": transport, "diagnostics.enabled": transport == "float32"}
    )
    labels: dict[str, object] = {"method": method, "seed": seed, "transport": transport}
    return config, raw_dir / f"rounds-{method}-{transport}-seed{seed}.json", labels


def keep_round_key(key: str) -> bool:
    return key in ROUND_KEYS or key.startswith("barrier/")


def centralised(seed: int, overrides: dict, raw_dir: Path, check_config: bool = True) -> dict:
    """Plain LoRA on the pooled training data for the federation's total number of steps."""
    cache = raw_dir / f"centralised-seed{seed}.json"
    federated = RunConfig.from_flat({**BASE, **MULTI_ROUND, **overrides})
    total_steps = federated.federation.clients * federated.federation.rounds * federated.train.local_steps
    config = RunConfig.from_flat(
        {**BASE, **MULTI_ROUND, **overrides, "seed": seed, "copra.enabled": False}
        | {"data.partition": "iid", "federation.clients": 1, "federation.rounds": 1, "train.local-steps": total_steps}
    )
    cached = read_cache(cache, config, check_config)
    if cached is not None:
        return cached
    started = time.perf_counter()
    learner = ClientLearner(config, 0, 1)
    bundle = learner.bundle
    bundle.base_offsets.apply(bundle.model, {})
    state, _ = learner.fit(bundle.initial_state(), 1, 1)
    evaluator = ServerEvaluator(
        bundle, bundle.task.server_examples(config.data.eval_size), config.diagnostics.batch_size
    )
    result = {
        "seed": seed,
        "config": comparable_config(config),
        "steps": total_steps,
        "accuracy": evaluator.factor(state)[bundle.task.metric],
        "seconds": time.perf_counter() - started,
    }
    atomic_write_text(cache, json.dumps(result))
    return result


# ---------------------------------------------------------------------- summary
def summarise(one_shots: list[dict], rounds: list[dict], central: list[dict]) -> dict:
    summary: dict = {"one_shot": {}, "multi_round": {}, "targets": {}}
    for dataset in DATASETS:
        for regime in REGIMES:
            for method in METHODS:
                items = [x for x in one_shots if (x["dataset"], x["regime"], x["method"]) == (dataset, regime, method)]
                if not items:
                    continue

                def mean_client(x: dict, pattern: str) -> float:
                    return statistics.fmean(x["accuracy"][pattern]["clients"])

                summary["one_shot"][f"{dataset}/{regime}/{method}"] = {
                    "dataset": dataset,
                    "regime": regime,
                    "method": method,
                    "seeds": len(items),
                    "clients": mean_std(mean_client(x, "full") for x in items),
                    "merged": mean_std(x["accuracy"]["full"]["merged"] for x in items),
                    "merge_deficit": mean_std(x["merge_deficit"] for x in items),
                    "jensen_factor": mean_std(x["jensen_factor"] for x in items),
                    "jensen_product": mean_std(x["jensen_product"] for x in items),
                    "barrier_half": mean_std(x["barrier_half"] for x in items),
                    "barrier_max": mean_std(x["barrier_max"] for x in items),
                    "merged_every_other": mean_std(x["accuracy"]["every_other"]["merged"] for x in items),
                    "merged_last_half": mean_std(x["accuracy"]["last_half"]["merged"] for x in items),
                    "clients_every_other": mean_std(mean_client(x, "every_other") for x in items),
                    "clients_last_half": mean_std(mean_client(x, "last_half") for x in items),
                    "seconds": statistics.fmean(x["seconds"] for x in items),
                }
    for method in METHODS:
        for transport in ("float32", "float16"):
            items = [x for x in rounds if x["method"] == method and x["transport"] == transport]
            if not items:
                continue
            n_rounds = len(items[0]["rows"])
            later = [r for x in items for r in x["rows"][1:]]
            summary["multi_round"][f"{method}/{transport}"] = {
                "method": method,
                "transport": transport,
                "seeds": len(items),
                "per_round": [mean_std(x["rows"][i]["global/accuracy"] for x in items) for i in range(n_rounds)],
                "final": mean_std(x["rows"][-1]["global/accuracy"] for x in items),
                **{
                    name: [mean_std(x["rows"][i][key] for x in items) for i in range(1, n_rounds)]
                    for name, key in (
                        ("barrier_max", "barrier/pairwise_max"),
                        ("jensen_factor", "barrier/jensen_factor"),
                    )
                    if items[0]["rows"][-1].get(key) is not None  # not in the float16 runs (no diagnostics)
                },
                "bytes_up_per_client": statistics.fmean(r["comm/bytes_up"] / r["clients/sampled"] for r in later),
                "bytes_down_per_client": statistics.fmean(r["comm/bytes_down"] / r["clients/sampled"] for r in later),
            }
    if central:
        summary["centralised"] = {
            "accuracy": mean_std(x["accuracy"] for x in central),
            "steps": central[0]["steps"],
            "seeds": len(central),
        }
    summary["targets"] = targets(summary)
    return summary


def targets(summary: dict) -> dict:
    """The issue's targets, measured (whatever they are)."""
    out: dict = {}
    shots = summary["one_shot"]
    for dataset in DATASETS:
        copra, lora = (
            shots.get(f"{dataset}/stress/dirichlet0.05/copra"),
            shots.get(f"{dataset}/stress/dirichlet0.05/lora"),
        )
        if copra and lora:
            out[f"{dataset}/stress barrier ratio (CopRA / LoRA, alpha 0.5)"] = _ratio(
                copra["barrier_half"][0], lora["barrier_half"][0]
            )
            out[f"{dataset}/stress merge-deficit ratio (CopRA / LoRA)"] = _ratio(
                copra["merge_deficit"][0], lora["merge_deficit"][0]
            )
        for regime in REGIMES:
            copra, lora = shots.get(f"{dataset}/{regime}/copra"), shots.get(f"{dataset}/{regime}/lora")
            if copra and lora and regime.startswith("probe/"):
                out[f"{dataset}/{regime} barrier ratio (CopRA / LoRA, alpha 0.5)"] = _ratio(
                    copra["barrier_half"][0], lora["barrier_half"][0]
                )
                out[f"{dataset}/{regime} merge-deficit ratio (CopRA / LoRA)"] = _ratio(
                    copra["merge_deficit"][0], lora["merge_deficit"][0]
                )
            if copra and lora:
                out[f"{dataset}/{regime} merged CopRA - LoRA (points)"] = 100 * (copra["merged"][0] - lora["merged"][0])
                out[f"{dataset}/{regime} pruned (every other) merged CopRA - LoRA (points)"] = 100 * (
                    copra["merged_every_other"][0] - lora["merged_every_other"][0]
                )
                out[f"{dataset}/{regime} pruned (last half) merged CopRA - LoRA (points)"] = 100 * (
                    copra["merged_last_half"][0] - lora["merged_last_half"][0]
                )
    rounds = summary["multi_round"]
    if "copra/float32" in rounds and "lora/float32" in rounds:
        out["multi-round final CopRA - LoRA (points)"] = 100 * (
            rounds["copra/float32"]["final"][0] - rounds["lora/float32"]["final"][0]
        )
        if "centralised" in summary:
            out["multi-round CopRA / centralised"] = (
                rounds["copra/float32"]["final"][0] / summary["centralised"]["accuracy"][0]
            )
    for method in METHODS:
        if f"{method}/float16" in rounds and f"{method}/float32" in rounds:
            out[f"{method}: fp16 - fp32 transport final accuracy (points)"] = 100 * (
                rounds[f"{method}/float16"]["final"][0] - rounds[f"{method}/float32"]["final"][0]
            )
    return out


def _ratio(a: float, b: float) -> float | None:
    """a / b, or None when b is not positive (a ratio of barriers needs a positive LoRA barrier)."""
    return a / b if b > 0 else None


# ---------------------------------------------------------------------- plots and document
def plot_curves(one_shots: list[dict], path: Path) -> None:
    """Loss along the straight line between one pair of clients (seed 0), per dataset and regime."""
    keys = [(d, r) for d in DATASETS for r in REGIMES]
    keys = [k for k in keys if any((x["dataset"], x["regime"]) == k for x in one_shots)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), squeeze=False)
    for ax, (dataset, regime) in zip(axes[0], keys, strict=True):
        for method, colour in (("copra", "tab:orange"), ("lora", "tab:blue")):
            items = sorted(
                (x for x in one_shots if (x["dataset"], x["regime"], x["method"]) == (dataset, regime, method)),
                key=lambda x: x["seed"],
            )
            if not items:
                continue
            curve = items[0]["curve"]
            ax.plot(curve["alphas"], curve["loss_factor"], "o-", color=colour, label=f"{method}, factor space")
            ax.plot(curve["alphas"], curve["loss_product"], "s--", color=colour, alpha=0.6, label=f"{method}, product")
        ax.set_title(f"{dataset}, {regime} (seed 0)", fontsize=9)
        ax.set_xlabel("alpha (1 = client i)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss on the diagnostic sample")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rounds(summary: dict, central: dict | None, path: Path) -> None:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for item in summary["multi_round"].values():
        if item["transport"] != "float32":
            continue
        means = [m for m, _ in item["per_round"]]
        ax.plot(range(len(means)), means, "o-", label=item["method"])
        barrier = [m for m, _ in item["barrier_max"]]
        jensen = [m for m, _ in item["jensen_factor"]]
        ax2.plot(range(1, len(barrier) + 1), barrier, "o-", label=f"{item['method']}: pairwise barrier (max)")
        ax2.plot(range(1, len(jensen) + 1), jensen, "s--", label=f"{item['method']}: Jensen gap (factor)")
    if central:
        ax.axhline(central["accuracy"][0], color="grey", ls=":", label=f"centralised LoRA ({central['steps']} steps)")
    ax.set_xlabel("round")
    ax.set_ylabel("SST-2 dev accuracy (mean over seeds)")
    ax.set_title("Multi-round federation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2.axhline(0.0, color="grey", lw=0.8)
    ax2.set_xlabel("round")
    ax2.set_ylabel("nats")
    ax2.set_title("Barrier figures per round (mean over seeds)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(summary: dict, command: str, overrides: dict, seeds: list[int], timing: str, path: Path) -> None:
    lines = [
        "# CopRA vs plain LoRA in federation",
        "",
        f"Command: `{command}` ({timing}). "
        f"Seeds {seeds}; every figure is mean ± std "
        "over seeds. Shared setting: " + ", ".join(f"`{k}={v}`" for k, v in {**BASE, **overrides}.items()) + ". "
        "Per dataset: "
        + "; ".join(f"{d}: " + ", ".join(f"`{k}={v}`" for k, v in o.items()) for d, o in DATASET_OVERRIDES.items())
        + ".",
        "",
        "AG News: only the official test file is available offline; copra-fl splits it once into "
        "6,600 training rows (partitioned across clients) and 1,000 held-out rows (evaluation), "
        "see data/MANIFEST.md.",
        "",
        "## One-shot merge (one round, linear averaging) and layer pruning",
        "",
        "Regimes: "
        + "; ".join(f"`{r}`: " + ", ".join(f"`{k}={v}`" for k, v in s.items()) for r, s in REGIMES.items())
        + ". The `probe/` regimes (SST-2 only, `--investigate`) look into the missed targets. "
        "Accuracy on the evaluation set; Jensen gaps and barriers in nats on the diagnostic sample "
        "(positive = the merged/interpolated adapter is worse than its clients).",
        "",
        "Merge deficit: the clients' example-weighted mean accuracy minus the merged adapter's "
        "(the clients column is the plain mean).",
        "",
        "| dataset | regime | method | seeds | clients (mean) | merged | merge deficit | Jensen factor "
        "| Jensen product | barrier α=0.5 | barrier max | merged, every other block pruned | merged, last half pruned "
        "| clients, every other pruned | clients, last half pruned |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for item in summary["one_shot"].values():
        lines.append(
            f"| {item['dataset']} | {item['regime']} | {item['method']} | {item['seeds']} | {pm(item['clients'])} "
            f"| {pm(item['merged'])} "
            f"| {pm(item['merge_deficit'])} | {pm(item['jensen_factor'])} | {pm(item['jensen_product'])} "
            f"| {pm(item['barrier_half'])} | {pm(item['barrier_max'])} | {pm(item['merged_every_other'])} "
            f"| {pm(item['merged_last_half'])} | {pm(item['clients_every_other'])} | {pm(item['clients_last_half'])} |"
        )
    lines += ["", "![interpolation curves](copra_vs_lora_curves.png)", ""]
    rounds = summary["multi_round"]
    if rounds:
        lines += [
            "## Multi-round federation and communication",
            "",
            "Setting: " + ", ".join(f"`{k}={v}`" for k, v in MULTI_ROUND.items()) + ".",
            "",
            "| method | transport | final accuracy | accuracy per round | bytes up / client / round "
            "| bytes down / client / round |",
            "|---|---|---|---|---|---|",
        ]
        for item in rounds.values():
            per_round = " ".join(f"{m:.3f}" for m, _ in item["per_round"])
            lines.append(
                f"| {item['method']} | {item['transport']} | {pm(item['final'])} | {per_round} "
                f"| {item['bytes_up_per_client']:,.0f} | {item['bytes_down_per_client']:,.0f} |"
            )
        if "centralised" in summary:
            c = summary["centralised"]
            lines += ["", f"Centralised plain LoRA, pooled data, {c['steps']} steps: accuracy {pm(c['accuracy'])}."]
        lines += ["", "![rounds](copra_vs_lora_rounds.png)", ""]
    lines += ["## Targets, as measured", "", "| figure | value |", "|---|---|"]
    for name, value in summary["targets"].items():
        lines.append(f"| {name} | {'n/a (LoRA value <= 0: no ratio)' if value is None else f'{value:+.3f}'} |")
    findings = path.with_name(path.stem + "_findings.md")
    if findings.exists():  # hand-written analysis of the committed run (kept apart so a rerun keeps it)
        lines += ["", findings.read_text().strip()]
    lines.append("")
    atomic_write_text(path, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--seeds", default=None, help="Comma-separated seeds (default 0,1,2; --quick: 0,1).")
    parser.add_argument("--quick", action="store_true", help="2-layer model, SST-2, fewer steps (a few minutes).")
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="Output folder.")
    parser.add_argument(
        "--report-only", action="store_true", help="Only summarise the runs already cached (run nothing new)."
    )
    parser.add_argument(
        "--investigate",
        action="store_true",
        help="Also run the SST-2 probe regimes (PROBES) that look into missed targets (~20 min more).",
    )
    args = parser.parse_args()
    started = time.perf_counter()

    def skip(cache: str) -> bool:
        return args.report_only and not (raw_dir / cache).exists()

    # --quick is a smoke run of the pipeline: two seeds keep it within 5 minutes.
    args.seeds = args.seeds or ("0,1" if args.quick else "0,1,2")
    seeds = [int(s) for s in args.seeds.split(",")]
    name = "copra_vs_lora_quick" if args.quick else "copra_vs_lora"
    raw_dir = args.out / f"{name}_raw"
    overrides = dict(QUICK) if args.quick else {}
    datasets = ("sst2",) if args.quick else DATASETS
    one_shots = []
    jobs = [(d, r) for d in datasets for r in ONE_SHOT]
    if args.investigate:
        jobs += [("sst2", r) for r in PROBES]
    for dataset, regime in jobs:
        for seed in seeds:
            for method in METHODS:
                if skip(f"oneshot-{dataset}-{regime.replace('/', '-')}-{method}-seed{seed}.json"):
                    continue
                shot_overrides = dict(overrides)
                if args.quick:  # a few steps only: the quick run checks the pipeline, not the claims
                    shot_overrides["train.local-steps"] = 4 if regime.startswith("default") else 8
                result = one_shot(dataset, regime, method, seed, shot_overrides, raw_dir, not args.report_only)
                acc = result["accuracy"]["full"]
                print(
                    f"one-shot {dataset} {regime:20s} {method:5s} seed {seed}: merged {acc['merged']:.3f} "
                    f"clients {statistics.fmean(acc['clients']):.3f} ({result['seconds']:.0f}s)",
                    flush=True,
                )
                one_shots.append(result)
    round_overrides = dict(overrides) | ({"federation.rounds": 2, "train.local-steps": 4} if args.quick else {})
    # Every multi-round federation in one simulation: the simulated nodes start once.
    round_jobs = [
        multi_round_job(method, seed, transport, round_overrides, raw_dir)
        for seed in seeds
        for method in METHODS
        for transport in ("float32", "float16")
        if not skip(f"rounds-{method}-{transport}-seed{seed}.json")
    ]

    def show(result: dict) -> None:
        accuracy = result["rows"][-1]["global/accuracy"]
        print(f"rounds {result['method']:5s} {result['transport']} seed {result['seed']}: {accuracy:.3f}", flush=True)

    rounds = cached_runs(round_jobs, keep_round_key, progress=show, check_config=not args.report_only)
    central = [
        centralised(seed, round_overrides, raw_dir, not args.report_only)
        for seed in seeds
        if not skip(f"centralised-seed{seed}.json")
    ]
    summary = summarise(one_shots, rounds, central)
    command = "python -m benchmarks.copra_vs_lora" + (" --quick" if args.quick else "")
    command += " --investigate" if args.investigate else ""
    if args.seeds != ("0,1" if args.quick else "0,1,2"):
        command += f" --seeds {args.seeds}"
    atomic_write_text(args.out / f"{name}.json", json.dumps(summary, indent=1))
    plot_curves(one_shots, args.out / f"{name}_curves.png")
    plot_rounds(summary, summary.get("centralised"), args.out / f"{name}_rounds.png")
    default_s = sum(
        x["seconds"] for x in [*one_shots, *rounds, *central] if not x.get("regime", "").startswith("probe/")
    )
    probe_s = sum(x["seconds"] for x in one_shots if x["regime"].startswith("probe/"))
    timing = (
        f"default setting {default_s / 60:.1f} min of run time on this machine, summed over its runs"
        + (f"; probes {probe_s / 60:.1f} min more" if probe_s else "")
        + (
            ""
            if args.report_only
            else f"; this invocation took {(time.perf_counter() - started) / 60:.1f} min wall-clock, cached runs reused"
        )
    )
    write_markdown(summary, command, overrides, seeds, timing, args.out / f"{name}.md")
    print((args.out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
