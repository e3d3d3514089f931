"""Every aggregation rule on equal terms: SST-2, K non-IID clients, CopRA and plain LoRA, seeds.

Each (rule, method, seed) is one simulated federation through Flower (the same
ServerApp/ClientApp as ``copra-fl simulate``), with the same partitions, steps and
initial adapter for every rule. Per run it records the global dev accuracy per round
and the per-round diagnostics; the table gives mean +- std over seeds of:

* final accuracy (server evaluation of the global adapter on SST-2 dev);
* rounds to 95 %: first round whose accuracy reaches 95 % of the *linear* rule's mean
  final accuracy in the same setting (one fixed target per setting, so rules compare);
* aggregate error: relative distance of the rule's ``B A`` from the exact product
  average ``sum_k w_k B_k A_k``, mean over rounds (0 = exact);
* Jensen gap of the rule's aggregate: its loss minus the clients' mean loss on the
  diagnostic sample, mean over rounds (> 0: the aggregate is worse than its clients).

Run it as a module (``python -m``): as a script, this file would shadow the
``strategies`` package it benchmarks. Finished runs are cached under
``<out>/strategies_raw/`` and skipped when the command is rerun, so an interrupted
benchmark resumes. Writes ``strategies.md``, ``strategies.json`` and
``strategies_accuracy.png`` to ``--out``.

Usage: python -m benchmarks.strategies [--quick] [--rules linear,ffa,...] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import strategies
from benchmarks.common import cached_run, mean_std, pm
from copra_core.config import RunConfig
from copra_core.reporting import atomic_write_text, plt  # reporting selects the headless backend

#: The benchmark's federation: the full 6-layer default model, short sequences and few
#: steps, so 10 rules x 2 methods x 3 seeds fit in about an hour on a 2-core CPU. A
#: constant learning rate, so late rounds still move the adapters and the rules differ.
SETTING: dict[str, object] = {
    "federation.clients": 8,
    "federation.rounds": 4,
    "federation.fraction-evaluate": 0.0,
    "model.max-length": 48,
    "train.local-steps": 15,
    "train.batch-size": 16,
    "train.lr-schedule": "constant",
    "data.partition": "dirichlet",
    "data.dirichlet-alpha": 0.5,
    "data.eval-size": 300,
    "data.val-max": 16,
    "diagnostics.sample-size": 48,
    "diagnostics.pairs": 1,
    "diagnostics.grid": "0,0.5,1",
}
QUICK: dict[str, object] = {"federation.clients": 4, "federation.rounds": 3, "train.local-steps": 20}
METHODS = {"copra": True, "lora": False}


def run_one(
    rule: str, method: str, seed: int, overrides: dict[str, object], raw_dir: Path, check_config: bool = True
) -> dict:
    """One federation; cached as JSON so a rerun skips it."""
    config = RunConfig.from_flat({**SETTING, **overrides})
    config.update({"strategy.name": rule, "copra.enabled": METHODS[method], "seed": seed})
    keep = ("round", "global/accuracy", "aggregation/aggregate_error", "barrier/jensen_aggregate")
    return cached_run(
        config,
        raw_dir / f"{method}-{rule}-seed{seed}.json",
        lambda key: key in keep or key.startswith("strategy/"),
        check_config=check_config,
        rule=rule,
        method=method,
        seed=seed,
    )


def summarise(results: list[dict], rules: list[str], methods: list[str]) -> dict:
    summary: dict = {}
    for method in methods:
        runs = {r: [x for x in results if x["method"] == method and x["rule"] == r] for r in rules}
        linear_final = [x["rows"][-1]["global/accuracy"] for x in runs.get("linear", [])]
        target = 0.95 * statistics.fmean(linear_final) if linear_final else None
        for rule, items in runs.items():
            if not items:
                continue
            finals = [x["rows"][-1]["global/accuracy"] for x in items]
            rounds_to = [
                next((r["round"] for r in x["rows"] if target and r["global/accuracy"] >= target), None) for x in items
            ]
            later = [r for x in items for r in x["rows"][1:]]
            summary[f"{method}/{rule}"] = {
                "method": method,
                "rule": rule,
                "seeds": len(items),
                "final_accuracy": mean_std(finals),
                "rounds_to_95": mean_std([r for r in rounds_to if r is not None]) if any(rounds_to) else None,
                "reached_95": sum(r is not None for r in rounds_to),
                "aggregate_error": statistics.fmean(r["aggregation/aggregate_error"] for r in later),
                "jensen_aggregate": statistics.fmean(r["barrier/jensen_aggregate"] for r in later),
                "seconds": statistics.fmean(x["seconds"] for x in items),
                "target_accuracy": target,
            }
    return summary


def plot(results: list[dict], rules: list[str], methods: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4.2), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 11+ rules: tab10 would repeat colours
        for rule in rules:
            items = [x for x in results if x["method"] == method and x["rule"] == rule]
            if not items:
                continue
            rounds = [r["round"] for r in items[0]["rows"]]
            mean = [statistics.fmean(x["rows"][i]["global/accuracy"] for x in items) for i in range(len(rounds))]
            ax.plot(rounds, mean, "o-", ms=3, label=rule)
        ax.set_title(f"{'CopRA' if method == 'copra' else 'plain LoRA'}: global dev accuracy (mean over seeds)")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def per_seed_means(results: list[dict]) -> dict[str, dict[int, float]]:
    """Mean final accuracy over all rules, per method and seed: how hard each seed's partition is."""
    out: dict[str, dict[int, float]] = {}
    for method in sorted({x["method"] for x in results}):
        for seed in sorted({x["seed"] for x in results}):
            finals = [x["rows"][-1]["global/accuracy"] for x in results if x["method"] == method and x["seed"] == seed]
            if finals:
                out.setdefault(method, {})[seed] = statistics.fmean(finals)
    return out


def write_markdown(
    summary: dict, command: str, overrides: dict, seeds: list[int], path: Path, seed_means: dict | None = None
) -> None:
    setting = {**SETTING, **overrides}
    lines = [
        "# Aggregation rules compared",
        "",
        f"Command: `{command}`",
        "",
        "Setting (RunConfig keys; the rest are the defaults): "
        + ", ".join(f"`{k}={v}`" for k, v in setting.items())
        + f"; seeds {seeds}. Every rule sees the same partitions, initial adapter and local steps.",
        "",
        "| method | rule | seeds | final accuracy | rounds to 95 % of linear | aggregate error "
        "| Jensen gap (aggregate) | s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for item in summary.values():
        reached = f" ({item['reached_95']}/{item['seeds']} reached)" if item["reached_95"] < item["seeds"] else ""
        lines.append(
            f"| {item['method']} | {item['rule']} | {item['seeds']} | {pm(item['final_accuracy'])} | "
            f"{pm(item['rounds_to_95'], 1)}{reached} | {item['aggregate_error']:.4f} | "
            f"{item['jensen_aggregate']:+.4f} | {item['seconds']:.0f} |"
        )
    for method in sorted({v["method"] for v in summary.values()}):
        rows = [v for v in summary.values() if v["method"] == method]
        best = max(rows, key=lambda v: v["final_accuracy"][0])
        lines += ["", f"Best final accuracy, {method}: **{best['rule']}** ({pm(best['final_accuracy'])})."]
    if seed_means:
        lines += [
            "",
            "Mean final accuracy over all rules, per seed: "
            + "; ".join(
                f"{method}: " + ", ".join(f"seed {seed} {value:.3f}" for seed, value in by_seed.items())
                for method, by_seed in seed_means.items()
            )
            + ". A seed far below the others for every rule points at its partition, not at one rule.",
        ]
    eval_size = int(setting["data.eval-size"])
    noise = (0.78 * 0.22 / eval_size) ** 0.5
    lines += [
        "",
        f"Reading it: one accuracy on {eval_size} dev examples has a standard error of about {noise:.3f}, "
        "and seeds change partitions and initialisation too, so differences smaller than the ± "
        "spreads are not evidence that one rule is better. The aggregate-error column is a "
        "property of each rule (0 for ffa and residual by construction) and differs far beyond noise.",
        "",
        "![accuracy per round](strategies_accuracy.png)",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rules", default=",".join(sorted(strategies.BUILTIN)), help="Comma-separated rule names.")
    parser.add_argument("--methods", default="copra,lora", help="copra, lora or both.")
    parser.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds.")
    parser.add_argument("--quick", action="store_true", help="4 clients, 3 rounds, 20 steps (a few minutes).")
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="Output folder.")
    parser.add_argument(
        "--report-only", action="store_true", help="Only summarise the runs already cached (run nothing new)."
    )
    args = parser.parse_args()
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = QUICK if args.quick else {}
    name = "strategies_quick" if args.quick else "strategies"
    raw_dir = args.out / f"{name}_raw"
    results = []
    for seed in seeds:
        for method in methods:
            for rule in rules:
                if args.report_only and not (raw_dir / f"{method}-{rule}-seed{seed}.json").exists():
                    continue
                result = run_one(rule, method, seed, overrides, raw_dir, check_config=not args.report_only)
                final = result["rows"][-1]["global/accuracy"]
                print(
                    f"{method:5s} {rule:12s} seed {seed}: accuracy {final:.3f} ({result['seconds']:.0f}s)", flush=True
                )
                results.append(result)
    summary = summarise(results, rules, methods)
    command = "python -m benchmarks.strategies" + (" --quick" if args.quick else "")
    if args.seeds != "0,1,2":
        command += f" --seeds {args.seeds}"
    atomic_write_text(args.out / f"{name}.json", json.dumps(summary, indent=1))
    plot(results, rules, methods, args.out / f"{name}_accuracy.png")
    write_markdown(summary, command, overrides, seeds, args.out / f"{name}.md", per_seed_means(results))
    print((args.out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
