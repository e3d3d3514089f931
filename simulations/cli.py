"""``copra-fl`` command line (typer, as Flower's own CLI)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import click
import typer

from copra_core.config import ConfigError, field_help, key_choices, toml_value
from simulations.runner import FLOWER_ENV, preflight
from simulations.scenarios import scenario_config

app = typer.Typer(
    help="copra-fl: federated CopRA LoRA fine-tuning with barrier diagnostics (Flower).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


#: ``--method``: the value of copra.enabled each name stands for.
METHODS = {"copra": True, "lora": False}


def _choice(key: str) -> click.Choice:
    """The CLI choices of an option that sets config key ``key``: its ``Literal`` values."""
    return click.Choice(key_choices(key))


@app.command()
def simulate(
    out: Annotated[
        Path,
        typer.Option(
            help="Output folder (metrics.jsonl, report.md, plots, adapter/). A folder that already holds a run "
            "is refused unless --overwrite (or --resume)."
        ),
    ] = Path("runs/demo"),
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace the run already in the output folder (its outputs are removed first; federation.overwrite).",
        ),
    ] = False,
    rounds: Annotated[int | None, typer.Option(help="Server rounds (federation.rounds).")] = None,
    clients: Annotated[int | None, typer.Option(help="Simulated clients (federation.clients).")] = None,
    partition: Annotated[
        str | None, typer.Option(click_type=_choice("data.partition"), help="Client partitioning (data.partition).")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(click_type=click.Choice(list(METHODS)), help="CopRA or plain LoRA (copra.enabled)."),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(click_type=_choice("init.method"), help="Adapter initialisation (init.method; see init.source)."),
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(help="Aggregation rule: a name from `copra-fl strategies` or package.module:Class."),
    ] = None,
    strategy_options: Annotated[
        str | None,
        typer.Option(help="The rule's options, 'name=value,...' (strategy.options), e.g. 'trim-fraction=0.2'."),
    ] = None,
    track: Annotated[
        str | None,
        typer.Option(
            help="Log every round to these tracking backends, comma-separated: tensorboard, mlflow, wandb "
            "(tracking.backends; W&B offline; docs/tracking.md). Needs the copra-fl[tracking] extra."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Config override key=value (repeatable); see `copra-fl config`."),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            click_type=_choice("task"),
            help="sequence_classification (default: the SST-2 demo) or causal_lm (instruction tuning of "
            "SmolLM2-135M-Instruct on Dolly-15k, docs/causal_lm.md); picks the task's scenario.",
        ),
    ] = None,
    quick: Annotated[bool, typer.Option(help="Smoke run of about a minute (2-layer model, small samples).")] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue the run in this folder from its last checkpoint (written after every round). "
            "Give the original command's options: a config that differs is refused, naming the keys."
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False,
    display: Annotated[bool, typer.Option(help="Live progress bar and per-round table.")] = True,
) -> None:
    """Run a simulated federation; with no options, the demo (4 non-IID clients, CopRA, linear).

    Exit status: 0 done, 2 a configuration error (message on stderr, nothing run), 1 a failed run.
    """
    try:
        if task == "causal_lm":
            config = scenario_config("causal_lm-quick" if quick else "causal_lm")
        else:
            config = scenario_config("quick" if quick else "demo")
        config.out_dir = str(resume if resume is not None else out)
        overrides: dict[str, object] = {"federation.resume": resume is not None, "federation.overwrite": overwrite}
        if rounds is not None:
            overrides["federation.rounds"] = rounds
        if clients is not None:
            overrides["federation.clients"] = clients
        if partition is not None:
            overrides["data.partition"] = partition
        if strategy is not None:
            overrides["strategy.name"] = strategy
        if strategy_options is not None:
            overrides["strategy.options"] = strategy_options
        if init is not None:
            overrides["init.method"] = init
        if track is not None:
            overrides["tracking.backends"] = track
        if method is not None:
            overrides["copra.enabled"] = METHODS[method]
        config.update(overrides)
        config.apply_overrides(set_ or [])
        if config.tracking.backends:  # a missing library is an error now, not after Ray has started
            from copra_core.tracking import check_backends

            check_backends(config)
        preflight(config)  # everything that would fail in round 1, before Ray starts and the display shows
    except ConfigError as err:
        _config_error(err)

    from simulations.runner import simulate as run

    observers = []
    display_obj = None
    if display:
        from simulations.display import RichRoundDisplay

        label = "CopRA" if config.copra.enabled else "LoRA"
        from copra_core.tasks import TASKS

        display_obj = RichRoundDisplay(
            config.federation.rounds,
            f"{label} x {config.federation.clients} clients",
            metric=TASKS[config.task].metric if config.task in TASKS else "accuracy",
            where=config.diagnostics_where() if config.diagnostics.enabled else "server",
        )
        observers.append(display_obj)
        display_obj.start()
    started = time.perf_counter()
    try:
        out_dir = run(config, observers=observers, verbose=verbose)
    except Exception as err:  # report the cause in one line; --verbose shows the traceback
        if display_obj:
            display_obj.stop()
        if isinstance(err, ConfigError):
            _config_error(err)
        if verbose:
            raise
        typer.secho(f"error: {type(err).__name__}: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from err
    if display_obj:
        display_obj.stop()
    elapsed = time.perf_counter() - started
    typer.echo(f"Done in {elapsed:.0f}s. Report: {out_dir / 'report.md'}  Adapter: {out_dir / 'adapter'}")


def _config_error(err: ConfigError) -> None:
    """A configuration error: its message on stderr (no traceback) and exit status 2."""
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2) from err


@app.command("config")
def show_config(
    toml: Annotated[bool, typer.Option(help="Print as pyproject [tool.flwr.app.config] TOML.")] = False,
) -> None:
    """List every config key with its default and meaning."""
    for key, (default, text) in field_help().items():
        if toml:
            typer.echo(f"{key} = {toml_value(default)}")
        else:
            typer.echo(f"{key} = {default!r}\n    {text}")


@app.command("strategies")
def list_strategies() -> None:
    """List the aggregation rules: built-in and installed plug-ins, with their options."""
    import strategies
    from strategies.registry import describe

    for name in strategies.available():
        try:
            text = describe(strategies.resolve(name))
        except Exception as err:  # a broken plug-in is listed with its error, not hidden
            text = f"(cannot load: {err})"
        typer.echo(f"{name}\n    {text}")


BENCHMARKS = (
    "aggregation",
    "causal-lm",
    "copra-vs-lora",
    "heterolora-budget",
    "local-diagnostics",
    "lora-ga-convergence",
    "overhead",
    "strategies",
)


@app.command(
    "benchmark",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def benchmark(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(BENCHMARKS)}.")],
) -> None:
    """Run a benchmark from benchmarks/; further arguments go to it (try `copra-fl benchmark NAME --help`)."""
    import runpy
    import sys

    if name in ("-h", "--help"):  # help options are passed through to the benchmark, so handle them here
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    if name not in BENCHMARKS:
        typer.secho(f"error: unknown benchmark '{name}'; choose from {', '.join(BENCHMARKS)}", fg="red", err=True)
        raise typer.Exit(2)
    module = "benchmarks." + name.replace("-", "_")
    sys.argv = [f"copra-fl benchmark {name}", *ctx.args]
    runpy.run_module(module, run_name="__main__")


def main() -> None:
    # Flower reads these at import time; set them before anything imports flwr.
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    app(prog_name="copra-fl")


if __name__ == "__main__":
    sys.exit(main())
