"""Run a simulated federation in this process with Flower's simulation engine (Ray).

The ServerApp and ClientApp are the same objects ``flwr run .`` loads; this wrapper
only binds the config to the ServerApp and starts Flower's simulation runtime, for
users who do not want a SuperLink and a federation file.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from copra_core.config import SIMULATION_ENV, ConfigError, RunConfig

#: Set in every process that runs Flower: no runtime install of the app's dependencies, no telemetry, no update check.
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


def preflight(config: RunConfig) -> None:
    """Fail fast, before Ray starts, on anything that would fail in round 1.

    Configuration errors are ``ConfigError`` (``copra-fl`` exits with 2). The last step
    prepares the output folder (``prepare_out_dir``): an out-dir holding a run is refused
    unless ``federation.resume`` or ``federation.overwrite``, and an overwritten run is
    removed only once everything else has passed.
    """
    config.validate()  # before the imports below (torch, Flower): a mistyped value fails at once
    import strategies
    from copra_core import data
    from copra_core.checkpoint import FILE_NAME, check_resumable, load_checkpoint, prepare_out_dir
    from copra_core.model_loading import resolve_model_path
    from server.app import check_allocation

    rule = strategies.build(config.strategy.name, config.strategy.options)
    check_allocation(config, rule)
    if config.federation.resume:
        expected = RunConfig.from_flat(config.to_flat())
        expected.update(dict(rule.client_overrides))  # the server applies them before saving its config
        check_resumable(load_checkpoint(Path(config.out_dir)), expected.to_flat(), Path(config.out_dir) / FILE_NAME)
    if config.task == "causal_lm":
        from copra_core.tasks import build_task

        build_task(config).check_inputs(config.federation.clients)  # data, partitioning, model files
    elif config.data.is_path:
        check_data_path(config)
    else:
        spec = data.dataset_spec(config.data.dataset)
        data_dir = data.resolve_data_dir(config.data)
        for split in ("train", "eval"):
            data.read_split(data_dir, spec, split)
        path = resolve_model_path(config.model.name)
        if os.path.sep in path and not Path(path).exists():
            raise ConfigError(f"Config key 'model.name': local path '{path}' does not exist")
    prepare_out_dir(Path(config.out_dir), resume=config.federation.resume, overwrite=config.federation.overwrite)


def check_data_path(config: RunConfig) -> None:
    """A path in data.dataset exists, and a natural-partition folder holds one file per client.

    The files' content is checked by the nodes themselves in the round-0 data check (a node
    whose file does not fit the schema is left out, not the whole run).
    """
    from copra_core.local_data import is_natural_partition, natural_partition_files

    path = Path(config.data.dataset).expanduser()
    if not path.exists():
        raise ConfigError(f"Config key 'data.dataset': path '{path}' does not exist")
    if config.data.eval_path and not Path(config.data.eval_path).expanduser().exists():
        raise ConfigError(f"Config key 'data.eval-path': path '{config.data.eval_path}' does not exist")
    if is_natural_partition(path):
        files = natural_partition_files(path)
        if len(files) != config.federation.clients:
            raise ConfigError(
                f"Config key 'federation.clients' must equal the {len(files)} files of the natural partition "
                f"{path} (client i trains on file i), got {config.federation.clients}"
            )


def simulate(
    config: RunConfig, observers: Sequence = (), verbose: bool = False, client_app: object | None = None
) -> Path:
    """Run ``config`` as a Flower simulation; return the output folder.

    ``client_app`` replaces the project's ClientApp (custom clients, fault injection).
    """
    return simulate_many([config], observers, verbose, client_app)[0]


#: Config keys that decide the simulated SuperNodes: the runs of one sweep must agree on them.
NODE_KEYS = ("federation.clients", "federation.client-cpus", "federation.client-gpus")


def simulate_many(
    configs: Sequence[RunConfig],
    observers: Sequence = (),
    verbose: bool = False,
    client_app: object | None = None,
    after_run: Callable[[RunConfig], None] | None = None,
) -> list[Path]:
    """Run ``configs`` one after the other in one Flower simulation; return their output folders.

    Each run is a complete ``run_server`` (its own strategy, checkpoints, report) on the same
    SuperNodes. Starting a simulation's Ray actors costs tens of seconds on a CPU (each
    imports torch, transformers and PEFT and loads the model), and a sweep (benchmarks,
    tests) pays it once. A run in a sweep computes what it computes alone: the config,
    adapter and base offsets come with every message, and batches, masks and dropout are
    seeded from the config and the round; the only thing a client keeps between messages
    (its trained adapter, for client-side diagnostics) is tagged with its run's fingerprint.
    ``after_run`` is called after each run (benchmarks cache results as they come).
    """
    if not configs:
        raise ValueError("simulate_many: no configs to run")
    first = configs[0].to_flat()
    for config in configs[1:]:
        flat = config.to_flat()
        differing = [k for k in NODE_KEYS if flat[k] != first[k]]
        if differing:
            raise ConfigError(
                f"Config key '{differing[0]}': runs of one simulation share its SuperNodes, "
                f"got {first[differing[0]]!r} and {flat[differing[0]]!r}"
            )
    os.environ.update(FLOWER_ENV)
    # Ray's future default (keep CUDA_VISIBLE_DEVICES as is when num_gpus=0); silences its warning.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    for config in configs:
        preflight(config)
    # Imported late: flwr reads the FLWR_* variables at import time.
    from flwr.simulation import run_simulation

    from client.app import app as default_client_app
    from server.app import log_round, make_server_app

    server_app = make_server_app(list(configs), observers=tuple(observers) or (log_round,), after_run=after_run)
    if not verbose:
        # The console shows our own per-round display; Flower's INFO lines and its
        # deprecation notice for the Python simulation API would drown it.
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Ray's session files go to a private temporary folder that is removed afterwards.
    ray_tmp = tempfile.mkdtemp(prefix="copra-ray-")
    federation = configs[0].federation
    backend_config = {
        "client_resources": {"num_cpus": federation.client_cpus, "num_gpus": federation.client_gpus},
        "init_args": {
            "_temp_dir": ray_tmp,
            "include_dashboard": False,
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": verbose,
        },
    }
    # Tells the ClientApp it runs in this simulation, where paths in the run config are the user's
    # own (the Ray actors inherit it); a deployed node never has it (client/app.py). Removed after.
    os.environ[SIMULATION_ENV] = "1"
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app or default_client_app,
            num_supernodes=federation.clients,
            backend_config=backend_config,
            verbose_logging=verbose,
        )
    finally:
        os.environ.pop(SIMULATION_ENV, None)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return [Path(config.out_dir) for config in configs]
