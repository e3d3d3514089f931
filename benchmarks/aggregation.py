"""Aggregation performance: client-update throughput and memory of the streaming linear rule.

The adapter is a Llama-7B r = 16 LoRA on q, k, v and o of all 32 layers (lora_A 16 x 4096,
lora_B 4096 x 16): 16,777,216 parameters, 67.1 MB per client update in fp32. The tensors are
synthetic (random); only their sizes matter for speed and memory.

For each K in ``--clients`` every mode runs in a fresh subprocess, so its peak RSS
(``ru_maxrss``) belongs to that K and mode alone. The subprocess builds a pool of
``--pool`` distinct client payloads already encoded as fp32 ArrayRecords (what the server
receives), allocates the current global adapter, resets the kernel's RSS high-water mark
and records the baseline, then aggregates K updates ``--repeats`` times:

* streaming: ``LinearAveraging().aggregate(generator, current)`` where the generator
  decodes one pooled ArrayRecord per client with ``from_array_record`` (cycling the pool,
  distinct ``num_examples``), so decoding + aggregation is timed, as the server does it.
* rule-only: the same, from a pool of already decoded states (no decoding): the rule alone.
* materialised (``--with-baseline``, K <= ``--baseline-max-clients``): all K decoded states
  are first put in a list, then aggregated: the non-streaming way, for comparison.

Reported per K and mode: median time, client-update GB/s (K x fp32 wire bytes of one
update / median seconds, 1 GB = 1e9 bytes; also for the first run alone), minor page faults
per update, peak RSS during aggregation and peak RSS minus
the baseline ("working memory": what aggregation itself needs). Every run's result is
compared, tensor by tensor, with a float64 weighted mean of the pooled payloads, so no speed
is reported for a wrong result. Targets: streaming >= 1 GB/s, working memory flat in K.

Torch runs with ``--threads 1`` by default: each add is a 256 KB tensor, memory-bound and too
small to gain from intra-op threads, and on a shared 2-core CPU an OpenMP barrier per add
stalls whenever another process holds a core (measured while another job ran: 2 threads were
6x to 300x slower than one). ``--threads 0`` keeps torch's default to measure that case.

Usage (from the repository root; ``python benchmarks/aggregation.py`` works too):
       nice -n 10 python -m benchmarks.aggregation [--clients 8 32 128] [--repeats 3]
       [--pool 4] [--threads 1] [--no-with-baseline] [--baseline-max-clients 32] [--out-dir docs/results]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if not __package__:
    # Run as a script, sys.path[0] is benchmarks/, where benchmarks/strategies.py would shadow the
    # ``strategies`` package; put the repository root there instead, as ``python -m`` does.
    sys.path[0] = str(REPO_ROOT)

import torch  # noqa: E402

from copra_core.adapters import array_record_nbytes, from_array_record, to_array_record  # noqa: E402
from strategies.base import ClientUpdate  # noqa: E402
from strategies.linear import LinearAveraging  # noqa: E402

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MODES = ("streaming", "rule-only", "materialised")
TARGET_GBPS = 1.0
# The materialised baseline holds K decoded updates at once; past this it is never run, whatever
# the flags say, because the machine is shared (128 x 67 MB would be 8.6 GB).
MATERIALISED_LIMIT_BYTES = 4_000_000_000
MB = 1e6


def adapter_shapes(layers: int, hidden: int, rank: int) -> dict[str, tuple[int, int]]:
    """PEFT state-dict keys and shapes of a LoRA on q, k, v, o of every decoder layer."""
    shapes: dict[str, tuple[int, int]] = {}
    for layer in range(layers):
        for module in MODULES:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, hidden)
            shapes[f"{prefix}.lora_B.weight"] = (hidden, rank)
    return shapes


def num_examples(client: int) -> int:
    """Distinct per client, so a rule that ignored the weights would fail the check."""
    return 100 + 13 * client


def build_pool(shapes: Mapping[str, tuple[int, int]], size: int, seed: int) -> list[ArrayRecord]:
    """``size`` distinct random payloads, encoded as the fp32 ArrayRecords clients send."""
    generator = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(size):
        state = {key: torch.randn(shape, generator=generator).mul_(0.02) for key, shape in shapes.items()}
        pool.append(to_array_record(state, "float32"))
        del state  # keep one decoded payload alive at a time while building
    return pool


def rss_kib() -> int:
    """Resident set size now (KiB), from /proc, for when the high-water mark cannot be reset."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() // 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0), so ``ru_maxrss`` from now on is
    the peak of what follows, not of building the pool. False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def check_result(
    result: Mapping[str, torch.Tensor], pool: Sequence[ArrayRecord], clients: int, shapes: Mapping[str, tuple]
) -> float:
    """Compare every tensor with a float64 weighted mean of the pooled payloads; returns the
    largest absolute error and raises if any tensor is off (fp32 accumulation error is ~1e-8)."""
    if set(result) != set(shapes):
        raise AssertionError("aggregate returned the wrong keys")
    # Client i sent pool[i % P], so the mean is a weighted sum over the P distinct payloads.
    weights = [0.0] * len(pool)
    for client in range(clients):
        weights[client % len(pool)] += num_examples(client)
    total = sum(weights)
    worst = 0.0
    for key, shape in shapes.items():
        expected = sum(
            torch.from_numpy(record[key].numpy()).to(torch.float64) * (w / total)
            for record, w in zip(pool, weights, strict=True)
            if w
        )
        got = result[key]
        if tuple(got.shape) != tuple(shape) or got.dtype != torch.float32:
            raise AssertionError(f"{key}: {tuple(got.shape)} {got.dtype}, expected {shape} float32")
        torch.testing.assert_close(got.to(torch.float64), expected, rtol=1e-5, atol=1e-7)
        worst = max(worst, (got.to(torch.float64) - expected).abs().max().item())
    return worst


def run_worker(mode: str, clients: int, pool_size: int, repeats: int, shapes: Mapping[str, tuple], seed: int) -> dict:
    """One (mode, K) measurement in this process; returns a JSON-able dict."""
    pool = build_pool(shapes, pool_size, seed)
    wire_bytes = array_record_nbytes(pool[0])
    current = {key: torch.zeros(shape) for key, shape in shapes.items()}
    # Rule-only aggregates pre-decoded states; they are part of its baseline, not its working memory.
    decoded = [from_array_record(record) for record in pool] if mode == "rule-only" else []
    gc.collect()
    reset = reset_peak_rss()
    baseline_kib = peak_rss_kib() if reset else rss_kib()

    def streamed() -> Iterator[ClientUpdate]:
        # One decoded client update alive at a time (plus the one the rule is still reading).
        for client in range(clients):
            state = decoded[client % pool_size] if decoded else from_array_record(pool[client % pool_size])
            yield ClientUpdate(node_id=client, state=state, num_examples=num_examples(client))

    rule = LinearAveraging()
    seconds = []
    # Minor page faults per aggregation: how much of the time is the kernel handing out fresh
    # pages for decoded tensors rather than the decoding and adding themselves.
    faults = []
    result: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        result = {}  # drop the previous result before timing the next, as a server round would
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        if mode == "materialised":
            updates = [
                ClientUpdate(client, from_array_record(pool[client % pool_size]), num_examples(client))
                for client in range(clients)
            ]
            result = rule.aggregate(updates, current)
            del updates
        else:
            result = rule.aggregate(streamed(), current)
        seconds.append(time.perf_counter() - started)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    peak_kib = peak_rss_kib()
    max_abs_error = check_result(result, pool, clients, shapes)
    median = statistics.median(seconds)
    return {
        "mode": mode,
        "clients": clients,
        "pool": pool_size,
        "repeats": repeats,
        "update_wire_bytes": wire_bytes,
        "seconds": seconds,
        "minor_faults": faults,
        "median_s": median,
        "gb_per_s": clients * wire_bytes / median / 1e9,
        "first_gb_per_s": clients * wire_bytes / seconds[0] / 1e9,
        "faults_per_update": statistics.median(faults) / clients,
        "baseline_rss_kib": baseline_kib,
        "peak_rss_kib": peak_kib,
        "working_kib": peak_kib - baseline_kib,
        "peak_reset": reset,
        "max_abs_error": max_abs_error,
        "torch_threads": torch.get_num_threads(),
    }


def spawn(mode: str, clients: int, args: argparse.Namespace) -> dict:
    """Run one measurement in a fresh interpreter so peak RSS is per (mode, K)."""
    command = [
        sys.executable,
        "-m",  # as a module from the repository root, whichever way the parent was started
        "benchmarks.aggregation",
        "--worker",
        mode,
        "--clients",
        str(clients),
        "--pool",
        str(args.pool),
        "--repeats",
        str(args.repeats),
        "--layers",
        str(args.layers),
        "--hidden",
        str(args.hidden),
        "--rank",
        str(args.rank),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def table(rows: Sequence[dict]) -> list[str]:
    lines = [
        "| K | mode | median s | client-update GB/s | GB/s, 1st run | page faults / update "
        "| peak RSS MB | baseline RSS MB | working memory MB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['clients']} | {row['mode']} | {row['median_s']:.3f} | {row['gb_per_s']:.2f} "
            f"| {row['first_gb_per_s']:.2f} | {row['faults_per_update']:.0f} "
            f"| {row['peak_rss_kib'] * 1024 / MB:.0f} | {row['baseline_rss_kib'] * 1024 / MB:.0f} "
            f"| {row['working_kib'] * 1024 / MB:.0f} |"
        )
    return lines


def ratios(rows: Sequence[dict]) -> dict[str, Any]:
    """The figures the issue asks for, from this run's rows."""
    out: dict[str, Any] = {}
    for mode in ("streaming", "rule-only"):
        by_k = {r["clients"]: r for r in rows if r["mode"] == mode}
        if not by_k:
            continue
        out[f"{mode}_gbps_over_target"] = {k: r["gb_per_s"] / TARGET_GBPS for k, r in sorted(by_k.items())}
        low, high = min(by_k), max(by_k)
        if low != high:
            out[f"{mode}_working_memory_k{high}_over_k{low}"] = by_k[high]["working_kib"] / by_k[low]["working_kib"]
    materialised = {r["clients"]: r for r in rows if r["mode"] == "materialised"}
    if len(materialised) > 1:
        low, high = min(materialised), max(materialised)
        out[f"materialised_working_memory_k{high}_over_k{low}"] = (
            materialised[high]["working_kib"] / materialised[low]["working_kib"]
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128], help="values of K")
    parser.add_argument("--pool", type=int, default=4, help="distinct client payloads, cycled")
    parser.add_argument("--repeats", type=int, default=3, help="aggregations per (mode, K); the median is reported")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument(
        "--with-baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the materialised (non-streaming) baseline, for K <= --baseline-max-clients",
    )
    parser.add_argument("--baseline-max-clients", type=int, default=32)
    parser.add_argument("--out-dir", type=Path, default=Path("docs/results"))
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = adapter_shapes(args.layers, args.hidden, args.rank)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.clients[0], args.pool, args.repeats, shapes, args.seed)))
        return

    params = sum(a * b for a, b in shapes.values())
    print(
        f"adapter: {args.layers} layers x {len(MODULES)} modules, r = {args.rank}, d = {args.hidden}: "
        f"{len(shapes)} tensors, {params:,} params, {params * 4:,} bytes fp32 per client update"
    )
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu: {cpu_name()}")
    rows: list[dict] = []
    skipped: list[str] = []
    for clients in sorted(args.clients):
        for mode in MODES:
            if mode == "materialised":
                if not args.with_baseline or clients > args.baseline_max_clients:
                    continue
                if clients * params * 4 > MATERIALISED_LIMIT_BYTES:
                    skipped.append(f"materialised K={clients}: would hold {clients * params * 4 / 1e9:.1f} GB")
                    continue
            row = spawn(mode, clients, args)
            rows.append(row)
            print(
                f"K={clients:4d} {mode:12s} {row['median_s']:7.3f} s  {row['gb_per_s']:6.2f} GB/s  "
                f"peak {row['peak_rss_kib'] * 1024 / MB:7.0f} MB  working {row['working_kib'] * 1024 / MB:7.0f} MB  "
                f"(max |err| {row['max_abs_error']:.1e})",
                flush=True,
            )
    wire = rows[0]["update_wire_bytes"]
    measured = ratios(rows)
    print()
    print(f"client update on the wire (fp32 ArrayRecord, npy headers included): {wire:,} bytes")
    print("\n".join(table(rows)))
    print()
    for key, value in measured.items():
        if isinstance(value, dict):
            print(f"{key} (target >= 1): " + ", ".join(f"K={k}: {v:.2f}" for k, v in value.items()))
        else:
            target = " (target ~1, flat in K)" if key.startswith(("streaming", "rule-only")) else ""
            print(f"{key}{target}: {value:.2f}")
    for note in skipped:
        print(f"skipped {note}")

    launcher = ["python", "-m", "benchmarks.aggregation"] if __package__ else ["python", "benchmarks/aggregation.py"]
    command = shlex.join([*launcher, *sys.argv[1:]])
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    import flwr  # only for the version in the report

    machine = f"{cpu_name()}, 2-core CPU (torch threads {torch.get_num_threads()}), shared and noisy"
    environment = {
        "date": date,
        "command": f"nice -n 10 {command}",
        "machine": machine,
        "torch": torch.__version__,
        "flwr": getattr(flwr, "__version__", "unknown"),
        "python": platform.python_version(),
        "adapter": {
            "layers": args.layers,
            "modules": list(MODULES),
            "hidden": args.hidden,
            "rank": args.rank,
            "tensors": len(shapes),
            "params": params,
            "fp32_bytes": params * 4,
            "wire_bytes": wire,
        },
        "pool": args.pool,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "aggregation.json").write_text(
        json.dumps({**environment, "rows": rows, "ratios": measured, "skipped": skipped}, indent=2) + "\n"
    )
    (args.out_dir / "aggregation.md").write_text(markdown(environment, rows, measured, skipped))
    print(f"wrote {args.out_dir / 'aggregation.md'} and {args.out_dir / 'aggregation.json'}")


def markdown(
    environment: Mapping[str, Any], rows: Sequence[dict], measured: Mapping[str, Any], skipped: list[str]
) -> str:
    adapter = environment["adapter"]
    lines = [
        "# Aggregation performance: streaming linear rule",
        "",
        f"Produced by `{environment['command']}` on {environment['date']}.",
        f"Machine: {environment['machine']}; torch {environment['torch']}, flwr {environment['flwr']}, "
        f"Python {environment['python']}.",
        "",
        f"Adapter: Llama-7B shapes, {adapter['layers']} layers x {len(adapter['modules'])} modules "
        f"({', '.join(adapter['modules'])}), r = {adapter['rank']}, d = {adapter['hidden']}: "
        f"{adapter['tensors']} tensors, {adapter['params']:,} parameters, {adapter['fp32_bytes']:,} bytes fp32 "
        f"({adapter['wire_bytes']:,} bytes as an fp32 ArrayRecord). Synthetic random tensors; "
        f"{environment['pool']} distinct payloads cycled over the K clients, each with its own `num_examples`.",
        "",
        "Each (K, mode) ran in a fresh subprocess. Times are the median of "
        f"{environment['repeats']} aggregations; GB/s = K x wire bytes per update / median seconds "
        "(1 GB = 1e9 bytes); the 1st-run column is the first of them alone. Page faults are the median "
        "run's minor faults (`ru_minflt`) divided by K. Peak RSS is `ru_maxrss` after the kernel's "
        "high-water mark was reset once the pool of encoded payloads and the current adapter were built; "
        "that RSS is the baseline, and working memory = peak - baseline. MB = 1e6 bytes.",
        "",
        "* **streaming**: `LinearAveraging().aggregate(generator, current)`, the generator decoding one "
        "ArrayRecord per client with `from_array_record` (decoding + aggregation timed, as the server does it).",
        "* **rule-only**: the same over pre-decoded states (the rule alone, no decoding).",
        "* **materialised**: all K decoded states in a list first, then aggregated (non-streaming baseline; "
        "only for small K, since at K = 128 it would hold 8.6 GB).",
        "",
        *table(rows),
        "",
        "Ratios measured in this run:",
        "",
    ]
    for key, value in measured.items():
        if isinstance(value, dict):
            lines.append(
                f"* {key} (GB/s / {TARGET_GBPS:g} GB/s target, want >= 1): "
                + ", ".join(f"K={k}: {v:.2f}" for k, v in value.items())
            )
        else:
            lines.append(f"* {key}: {value:.2f}")
    lines += [f"* skipped {note}" for note in skipped]
    worst = max(r["max_abs_error"] for r in rows)
    lines += [
        "",
        f"Every run's result was checked tensor by tensor against a float64 weighted mean of the pooled "
        f"payloads (largest absolute error {worst:.1e}).",
        "",
        "## What is and is not flat in K",
        "",
        "What the streaming rule keeps flat in K is the aggregation's own working memory: one fp32 "
        "accumulator per tensor plus the one or two client updates being decoded and added. The server "
        "process as a whole still grows with K: Flower's Grid returns all K reply messages at once, so "
        "every client's encoded ArrayRecord (one wire-sized payload per client) is in memory before "
        "`aggregate_train` is called. Streaming avoids the second copy, the K decoded fp32 states, which "
        "the materialised baseline shows growing linearly with K. In this benchmark the received replies "
        f"are stood in for by a fixed pool of {environment['pool']} records, which is part of the baseline.",
        "",
        "## Reading the times",
        "",
        "* Decoding dominates the streaming time (compare rule-only), and much of that is page faults: "
        "each decoded update is freed once added, and when glibc gives that memory back to the OS "
        "(whether it does depends on the heap layout, so it varies between runs and K) the next decode "
        "faults it in again, thousands of faults per update (an update spans 16,384 pages of 4 KiB). "
        "Streaming rows with few faults per update show the speed without that cost.",
        "* The materialised baseline's median is faster than streaming only because its repeats reuse "
        "memory: the accumulator is allocated above the list of decoded states, so glibc cannot give the "
        "freed list back and the next repeat decodes into pages already mapped (fewer faults than streaming). Its "
        "first run, with fresh memory as a server round would have, is the slower one.",
        f"* Torch ran with {environment['torch_threads']} intra-op thread(s) (`--threads`); with two threads "
        "on this shared 2-core CPU the per-tensor adds stall on OpenMP barriers whenever another process "
        "holds a core.",
        "* The machine is shared, so times vary between runs; the run was niced.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
