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
    # Causal-LM instruction tuning (copra-fl simulate --task causal_lm): SmolLM2-135M-Instruct
    # (30 blocks, dequantised from the packaged GGUF), LoRA r = 8 on q_proj/v_proj (460.8 k
    # parameters), Dolly-15k's FedIT split of 10 clients with 2 sampled per round, CopRA,
    # linear averaging. Sized for the 15-minute budget on a 2-core CPU: 128-token sequences,
    # 3 rounds of 10 steps of 8 records, a 16-record diagnostic sample (32 records took
    # 105 s of a 280 s round on the idle machine and the run 16.5 min) and 8 generation prompts.
    "causal_lm": {
        "task": "causal_lm",
        "model.name": "default",
        "model.max-length": 128,
        "lora.target-modules": "q_proj,v_proj",
        "lora.modules-to-save": "auto",
        "data.dataset": "dolly",
        "data.partition": "dolly-fedit",
        "data.val-max": 16,
        "federation.clients": 10,
        "federation.fraction-train": 0.2,
        "federation.fraction-evaluate": 0.0,
        "federation.rounds": 3,
        "train.local-steps": 10,
        "train.batch-size": 8,
        "train.lr": 1e-3,
        "diagnostics.sample-size": 16,
        "diagnostics.batch-size": 16,
        "diagnostics.grid": "0,0.5,1",
        "causal-lm.min-response-tokens": 32,
    },
    # The causal-LM smoke run for tests: the same, with the model cut to 2 blocks and tiny samples.
    "causal_lm-quick": {
        "task": "causal_lm",
        "model.name": "default",
        "model.num-hidden-layers": 2,
        "model.max-length": 64,
        "lora.target-modules": "q_proj,v_proj",
        "lora.modules-to-save": "auto",
        "data.dataset": "dolly",
        "data.partition": "dolly-fedit",
        "data.val-max": 8,
        "data.eval-size": 16,
        "federation.clients": 10,
        "federation.fraction-train": 0.2,
        "federation.fraction-evaluate": 0.2,
        "federation.rounds": 2,
        "train.local-steps": 3,
        "train.batch-size": 4,
        "train.lr": 1e-3,
        "diagnostics.sample-size": 8,
        "diagnostics.batch-size": 8,
        "diagnostics.grid": "0,0.5,1",
        "causal-lm.min-response-tokens": 16,
        "causal-lm.generation-prompts": 2,
        "causal-lm.max-new-tokens": 8,
    },
}


def scenario_config(name: str) -> RunConfig:
    if name not in SCENARIOS:
        raise ValueError(f"Unknown scenario '{name}'; known: {sorted(SCENARIOS)}")
    return RunConfig.from_flat(SCENARIOS[name])
