"""Named scenarios: bundles of config overrides that ``copra-fl simulate`` starts from."""

from __future__ import annotations

from copra_core.config import RunConfig

SCENARIOS: dict[str, dict[str, object]] = {
    # The demo: the full 6-layer all-MiniLM-L6-v2, SST-2 split over 4 non-IID clients
    # (Dirichlet alpha 0.5 over labels), CopRA, linear averaging. Defaults of RunConfig.
    "demo": {},
    # Smoke run of about a minute for tests and checks: 2 blocks, small samples.
    "quick": {
        # A 2-block encoder sits on a plateau for ~80 steps (fresh head, LoRA B = 0),
        # hence the higher learning rate and 100 short steps per round (0.73-0.77 dev accuracy
        # for seeds 0, 1, 2 in-process).
        "model.num-hidden-layers": 2,
        "model.max-length": 32,
        "federation.clients": 2,
        "federation.rounds": 3,
        "train.local-steps": 100,
        "train.batch-size": 16,
        "train.lr": 1e-2,
        "data.partition": "iid",
        "data.eval-size": 200,
        "data.val-max": 32,
        "diagnostics.sample-size": 64,
        "diagnostics.pairs": 1,
        "diagnostics.grid": "0,0.5,1",
    },
}


def scenario_config(name: str) -> RunConfig:
    if name not in SCENARIOS:
        raise ValueError(f"Unknown scenario '{name}'; known: {sorted(SCENARIOS)}")
    return RunConfig.from_flat(SCENARIOS[name])
