"""Client-side vs server-side barrier diagnostics, on a run with barriers and on one without.

Two small federations through Flower's simulation (the ``copra-fl simulate`` code path),
both with ``diagnostics.where=both``, so every round is measured twice: by the server on
its diagnostic sample of the SST-2 dev set (``barrier/*``, docs/methods.md#diagnostics)
and by each client on its own validation rows (``local/*``,
docs/methods.md#client-side-diagnostics):

* ``barriers``: Dirichlet(0.1) label skew and a high constant learning rate, the setting
  where client adapters drift apart;
* ``calm``: IID partitions and a low learning rate.

Both runs share one simulation (the nodes start once). Each run is cached in
``<out>/local_diagnostics_raw/`` (a rerun reuses it; delete the folder to measure again).
Writes the comparison to ``--doc`` (default docs/results/local_vs_server_diagnostics.md).

Usage: python -m benchmarks.local_diagnostics [--out runs/local_diagnostics] [--doc PATH]
"""

from __future__ import annotations

import argparse
import datetime
import math
import time
from pathlib import Path

from benchmarks.common import cached_runs
from copra_core.config import RunConfig
from copra_core.reporting import atomic_write_text
from simulations.scenarios import scenario_config

ROOT = Path(__file__).resolve().parents[1]
#: Shared by both runs: the quick scenario's 2-block model and short sequences, 4 clients, 3 rounds.
BASE: dict[str, object] = {
    "federation.clients": 4,
    "federation.rounds": 3,
    "train.local-steps": 40,
    "train.batch-size": 16,
    "train.lr-schedule": "constant",
    "data.val-max": 64,
    "data.eval-size": 200,
    "diagnostics.sample-size": 64,
    "diagnostics.pairs": 2,
    "diagnostics.grid": "0,0.25,0.5,0.75,1",
    "diagnostics.where": "both",
}
SETTINGS: dict[str, dict[str, object]] = {
    "barriers": {"data.partition": "dirichlet", "data.dirichlet-alpha": 0.1, "train.lr": 2e-2},
    "calm": {"data.partition": "iid", "train.lr": 2e-3},
}
#: (metrics.jsonl key, column header) of the per-round comparison.
COLUMNS = (
    ("global/accuracy", "server acc"),
    ("barrier/jensen_aggregate", "server Jensen (aggregate)"),
    ("local/jensen_gap", "local Jensen"),
    ("barrier/pairwise_max", "server pairwise barrier"),
    ("local/barrier_max", "client-to-global barrier"),
    ("local/mean_accuracy_own", "clients' own acc (own rows)"),
    ("local/mean_accuracy_global", "aggregate acc (clients' rows)"),
)


def run_config(name: str) -> RunConfig:
    config = scenario_config("quick")
    config.update({**BASE, **SETTINGS[name]})
    return config


def _fmt(value: object, signed: bool = False) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _keep(key: str) -> bool:
    return key in ("round", "local_clients", "barrier/jensen_factor") or key.startswith(
        ("global/", "local/", "barrier/", "federated/")
    )


def section(name: str, result: dict) -> list[str]:
    rows = [r for r in result["rows"] if r["round"] > 0]
    settings = ", ".join(f"`{k}={v}`" for k, v in SETTINGS[name].items())
    lines = [f"## `{name}`: {settings}", "", f"Run time {result['seconds']:.0f} s.", ""]
    lines += ["| round | " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = [_fmt(row.get(k), signed="accuracy" not in k) for k, _ in COLUMNS]
        lines.append(f"| {row['round']} | " + " | ".join(cells) + " |")
    last = rows[-1]
    lines += ["", f"Per client, round {last['round']} (loss on the client's own validation rows):", ""]
    lines += [
        "| client | weight | L_k(theta_k) | L_k(theta_bar) | gap | barrier | curve (alpha = 0 ... 1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in last.get("local_clients", []):
        curve = ", ".join(f"{v:.3f}" for v in c["curve"])
        lines.append(
            f"| {c['partition-id']} | {c['weight']:.0f} | {c['loss_own']:.3f} | {c['loss_global']:.3f} | "
            f"{c['loss_global'] - c['loss_own']:+.3f} | {c['barrier']:+.3f} | {curve} |"
        )
    return [*lines, ""]


def summary(results: dict[str, dict]) -> list[str]:
    """One line per run: the largest barriers and the mean gaps over rounds 1..R, both sides."""

    def values(result: dict, key: str) -> list[float]:
        rows = [r for r in result["rows"] if r["round"] > 0]
        return [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]

    lines = [
        "## Summary (rounds 1 to R)",
        "",
        "| run | server pairwise barrier, max | client-to-global barrier, max | server Jensen (aggregate), mean | "
        "local Jensen, mean | rounds whose two gaps have the same sign |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        server_gap, local_gap = values(result, "barrier/jensen_aggregate"), values(result, "local/jensen_gap")
        same = sum((a > 0) == (b > 0) for a, b in zip(server_gap, local_gap, strict=True))
        cells = [
            _fmt(max(values(result, "barrier/pairwise_max")), signed=True),
            _fmt(max(values(result, "local/barrier_max")), signed=True),
            _fmt(sum(server_gap) / len(server_gap), signed=True),
            _fmt(sum(local_gap) / len(local_gap), signed=True),
            f"{same} of {len(local_gap)}",
        ]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines.append("")
    for name, result in results.items():
        server_gap, local_gap = values(result, "barrier/jensen_aggregate"), values(result, "local/jensen_gap")
        server_mean, local_mean = sum(server_gap) / len(server_gap), sum(local_gap) / len(local_gap)
        lines.append(
            f"- `{name}`: on the server's shared sample the aggregate is {_verdict(server_mean)} the "
            f"clients' adapters (mean gap {server_mean:+.3f}); on the clients' own rows it is "
            f"{_verdict(local_mean)} their own adapters (mean local gap {local_mean:+.3f})."
        )
    return [*lines, ""]


def _verdict(gap: float, tolerance: float = 0.02) -> str:
    """Words for a mean Jensen gap (nats): within ``tolerance`` of zero is 'about as good'."""
    if abs(gap) <= tolerance:
        return f"about as good (within {tolerance} nats) as"
    return "worse than" if gap > 0 else "better than"


def write_doc(results: dict[str, dict], path: Path, command: str) -> None:
    lines = [
        "# Client-side vs server-side barrier diagnostics",
        "",
        "Generated by `benchmarks/local_diagnostics.py`; regenerate with:",
        "",
        "```bash",
        command,
        "```",
        "",
        "Both runs use `diagnostics.where=both`: every round the server measures its diagnostics on "
        "its sample of the SST-2 dev set, and every client measures its own adapter against the "
        "aggregate on its own validation rows (definitions: [methods.md](../methods.md#client-side-diagnostics)). "
        "The two measure different things: the server's Jensen gap compares the aggregate with the "
        "clients' adapters on *one shared, balanced* sample; the local Jensen gap compares them on "
        "*each client's own* data, which is what a client loses (or gains) by taking the aggregate. "
        "The server's pairwise barrier is client-to-client; the client-to-global barrier is the bump "
        "on the line from each client's adapter to the aggregate, at the interior grid points "
        "(negative: the whole line lies below the chord).",
        "",
        "Setting shared by both runs (on top of `--quick`'s 2-block model): "
        + ", ".join(f"`{k}={v}`" for k, v in BASE.items())
        + f". Measured {datetime.date.today().isoformat()} on a 2-core CPU machine. Sized to finish in "
        "minutes: the 2-block model is far from trained (see the server's accuracy); the point is the "
        "diagnostics. `weight` is the client's training example count (its `w_k`).",
        "",
    ]
    lines += summary(results)
    for name, result in results.items():
        lines += section(name, result)
    atomic_write_text(path, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "local_diagnostics", help="Run caches.")
    parser.add_argument(
        "--doc", type=Path, default=ROOT / "docs" / "results" / "local_vs_server_diagnostics.md", help="The report."
    )
    args = parser.parse_args()
    raw = args.out / "local_diagnostics_raw"
    raw.mkdir(parents=True, exist_ok=True)
    jobs = [(run_config(name), raw / f"{name}.json", {"setting": name}) for name in SETTINGS]
    started = time.perf_counter()
    results = cached_runs(jobs, _keep, progress=lambda r: print(f"{r['setting']}: {r['seconds']:.0f} s", flush=True))
    write_doc(dict(zip(SETTINGS, results, strict=True)), args.doc, "python -m benchmarks.local_diagnostics")
    print(f"wrote {args.doc} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
