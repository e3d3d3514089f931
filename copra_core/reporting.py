"""Run outputs: metrics.jsonl (one object per round), report.md and its PNG plots."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: plots are files, never windows
import matplotlib.pyplot as plt

from copra_core.atomic import sibling_temp_path

#: Keys every round row carries (NaN where not measured, e.g. diagnostics at round 0).
ROUND_KEYS = (
    "round",
    "global/accuracy",
    "global/loss",
    "barrier/jensen_factor",
    "barrier/jensen_product",
    "barrier/pairwise_max",
    "aggregation/exactness_error",
    "aggregation/aggregate_error",
    "comm/bytes_up",
    "comm/bytes_down",
    "time/round_s",
)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file.

    The file gets the permissions a plain ``open(path, "w")`` would give it (those of the
    file it replaces, else 0o666 less the umask), not ``mkstemp``'s private 0o600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class MetricsLog:
    """Append-only metrics.jsonl; the file is rewritten atomically on every row."""

    def __init__(self, path: Path, rows: Sequence[dict[str, Any]] = ()) -> None:
        """``rows``: the rows so far of a resumed run (the file is rewritten with them)."""
        self.path = path
        self.rows: list[dict[str, Any]] = [dict(r) for r in rows]
        if self.rows:
            self._write()

    def append(self, row: dict[str, Any]) -> None:
        full = {key: row.get(key, float("nan")) for key in ROUND_KEYS} | row
        self.rows.append(full)
        self._write()

    def _write(self) -> None:
        text = "".join(json.dumps(_json_safe(r), sort_keys=False) + "\n" for r in self.rows)
        atomic_write_text(self.path, text)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(row["round"])
            ys.append(float(value))
    return xs, ys


def plot_accuracy(rows: Sequence[dict], metric: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, label, style in (
        (f"global/{metric}", "global adapter (server eval set)", "o-"),
        (f"diag/aggregate_{metric}", "global adapter (diag sample)", "o:"),
        (f"clients/mean_{metric}", "clients before averaging (mean, diag sample)", "s--"),
        (f"diag/product_avg_{metric}", "exact product-space average (diag sample)", "^:"),
    ):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, style, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_barriers(rows: Sequence[dict], path: Path) -> None:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.0))
    for key, label in (
        ("barrier/jensen_factor", "Jensen gap, factor space"),
        ("barrier/jensen_product", "Jensen gap, product space"),
        ("barrier/pairwise_max", "pairwise barrier (max), factor"),
        ("barrier/pairwise_max_product", "pairwise barrier (max), product"),
    ):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, "o-", label=label)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("loss above the clients' (nats)")
    ax.set_title("Interpolation barriers")
    ax.grid(alpha=0.3)
    for key, label in (
        ("aggregation/exactness_error", "factor averaging"),
        ("aggregation/aggregate_error", "this run's strategy"),
    ):
        xs, ys = _series(rows, key)
        if xs:
            ax2.plot(xs, ys, "o-", label=label)
    ax2.set_xlabel("round")
    ax2.set_ylabel("relative Frobenius error")
    ax2.set_title("Distance from the exact product average")
    ax2.grid(alpha=0.3)
    for axis in (ax, ax2):
        if axis.get_legend_handles_labels()[0]:  # nothing to label when diagnostics are off
            axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(rows: Sequence[dict], path: Path) -> bool:
    """Interpolation curves of the last round that has them."""
    last = next((r for r in reversed(rows) if r.get("curves")), None)
    if last is None:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    draw_interpolation_curves(ax, last)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def draw_interpolation_curves(axis: Any, row: dict) -> None:
    """One round's pairwise interpolation curves, factor and product space, on ``axis``
    (the report's plot and the trackers' per-round figure)."""
    for curve in row["curves"]:
        i, j = curve["pair"]
        axis.plot(curve["alphas"], curve["loss_factor"], "o-", label=f"clients {i}-{j}, factor")
        axis.plot(curve["alphas"], curve["loss_product"], "x--", label=f"clients {i}-{j}, product")
    _label(axis, "alpha (weight of the first client)", "loss", f"Interpolation curves, round {row.get('round')}")


def _label(axis: Any, xlabel: str, ylabel: str, title: str) -> None:
    """Axis labels, title, a light grid and a small legend: every plot of the report."""
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def plot_local(rows: Sequence[dict], path: Path) -> bool:
    """Client-side diagnostics (``diagnostics.where`` = clients or both): the local Jensen gap and the
    client-to-global barrier per round, and each client's curve from its own adapter to the aggregate
    in the last round that has them. False (no file) when no row has them."""
    last = next((r for r in reversed(rows) if r.get("local_clients")), None)
    if last is None:
        return False
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.0))
    for key, label in (
        ("local/jensen_gap", "local Jensen gap"),
        ("local/barrier_max", "client-to-global barrier (max)"),
        ("barrier/jensen_aggregate", "server: Jensen gap of the aggregate"),
        ("barrier/pairwise_max", "server: pairwise barrier (max)"),
    ):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, "o-" if key.startswith("local/") else "x:", label=label)
    ax.axhline(0.0, color="grey", lw=0.8)
    _label(ax, "round", "loss above the clients' own (nats)", "Measured on the clients' own data")
    for client in last["local_clients"]:
        ax2.plot(client["alphas"], client["curve"], "o-", label=f"client {client['partition-id']}")
    _label(
        ax2,
        "alpha (0 = the client's adapter, 1 = the aggregate)",
        "loss on the client's validation rows",
        f"Client-to-global curves, round {last['round']}",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4f}"
    if value is None:
        return "n/a"
    return str(value)


def write_report(out_dir: Path, rows: Sequence[dict], config_json: str, metric: str, title: str) -> Path:
    """report.md with a per-round table and three plots, next to metrics.jsonl."""
    out_dir = Path(out_dir)
    plot_accuracy(rows, metric, out_dir / "accuracy.png")
    plot_barriers(rows, out_dir / "barriers.png")
    has_curves = plot_curves(rows, out_dir / "interpolation.png")
    has_local = plot_local(rows, out_dir / "local.png")
    columns = [
        ("round", "round"),
        (f"global/{metric}", metric),
        ("global/loss", "loss"),
        (f"clients/mean_{metric}", f"clients {metric}"),
        ("barrier/jensen_factor", "Jensen (factor)"),
        ("barrier/jensen_product", "Jensen (product)"),
        ("barrier/pairwise_max", "pair barrier"),
        ("aggregation/exactness_error", "exactness err"),
        ("aggregation/aggregate_error", "aggregate err"),
        ("comm/bytes_up", "bytes up"),
        ("time/round_s", "round s"),
    ]
    if has_local:  # the clients' own measurements, next to the server's barriers
        at = [key for key, _ in columns].index("aggregation/exactness_error")
        columns[at:at] = [("local/jensen_gap", "local Jensen"), ("local/barrier_max", "client-global barrier")]
    # Further global metrics a task reports (causal_lm: perplexity, ROUGE-L of its generations).
    shown = {key for key, _ in columns}
    extra = sorted(
        {
            k
            for r in rows
            for k, v in r.items()
            if k.startswith(("global/", "generation/")) and k not in shown and _is_number(v)
        }
    )
    columns[3:3] = [(key, key.split("/", 1)[1]) for key in extra]
    lines = [f"# {title}", ""]
    final = rows[-1] if rows else {}
    lines += [
        f"Final global {metric}: **{_fmt(final.get(f'global/{metric}'))}** after round {final.get('round')}.",
        "",
        "| " + " | ".join(h for _, h in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k)) for k, _ in columns) + " |")
    lines += [
        "",
        "Barriers are losses above the clients' own (positive = averaging costs loss). "
        "Jensen gaps compare the averaged adapter with the weighted mean of the clients; "
        "the pairwise barrier is the worst point on the straight line between two clients.",
        "",
        f"![{metric}](accuracy.png)",
        "",
        "![barriers](barriers.png)",
        "",
    ]
    if has_curves:
        lines += ["![interpolation curves](interpolation.png)", ""]
    if has_local:
        lines += [
            "Client-side diagnostics, each client on its own validation rows: the local Jensen gap "
            "(the aggregate's loss minus the client's own adapter's, weighted; positive = averaging hurts the "
            "clients on their own data) and the client-to-global barrier (the worst bump above the straight line "
            "from a client's adapter to the aggregate).",
            "",
            "![client-side diagnostics](local.png)",
            "",
        ]
    generations = out_dir / "generations.md"  # written by tasks that generate text (causal_lm)
    if generations.is_file():
        lines += [generations.read_text(encoding="utf-8"), ""]
    lines += ["## Configuration", "", "```json", config_json, "```", ""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
