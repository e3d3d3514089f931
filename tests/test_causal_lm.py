"""The causal_lm task: Dolly data and its federated split, formatting and masking, the GGUF
decoder, loss and generation, and ``copra-fl simulate --task causal_lm --quick`` end to end
with its exported adapter reloaded through PEFT.

In-process tests share one 2-block SmolLM2 (dequantised from the packaged GGUF).
"""

from __future__ import annotations

import collections
import copy
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from copra_core.config import ConfigError, RunConfig
from copra_core.tasks import instruct_data
from copra_core.tasks.causal_lm import enable_checkpointing
from tests.helpers import run_tagged

ROOT = Path(__file__).resolve().parents[1]


def causal_config(**overrides: object) -> RunConfig:
    """The ``causal_lm-quick`` scenario (2-block model) with overrides."""
    from simulations.scenarios import scenario_config

    config = scenario_config("causal_lm-quick")
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def task():
    from copra_core.tasks import build_task

    return build_task(causal_config())


@pytest.fixture(scope="module")
def pretrained(task):
    """The 2-block base model, dequantised once (about 20 s); tests wrap deep copies of it."""
    return task.load_model()


@pytest.fixture(scope="module")
def peft_model(task, pretrained):
    from copra_core.lora import build_peft_model

    base, new_modules = pretrained
    return build_peft_model(copy.deepcopy(base), task.config.lora, new_modules, seed=0).eval()


# ---------------------------------------------------------------------- data
def test_dolly_records_and_fedit_split():
    settings = causal_config().data
    records = instruct_data.read_records(instruct_data.data_file(settings), instruct_data.instruct_spec("dolly"))
    assert len(records) == 15_011
    splits = collections.Counter(records["split"])
    assert splits["test"] == 80 and sum(splits.values()) == 15_011 and len(splits) == 11
    test = instruct_data.test_split(settings)
    assert set(collections.Counter(test["category"]).values()) == {10}  # 10 per category, 8 categories
    client0, val0 = instruct_data.client_splits(settings, 0, 10, seed=0)
    # The manifest: client 0 holds summarization, closed_qa and classification.
    assert set(client0["category"]) | set(val0["category"]) == {"summarization", "closed_qa", "classification"}
    assert len(instruct_data.client_partition(settings, 0, 10, 0)) == 1_493  # local_training_0.json
    assert len(val0) == settings.val_max
    for pid in range(10):
        categories = set(instruct_data.client_partition(settings, pid, 10, 0)["category"])
        assert 2 <= len(categories) <= 3, (pid, categories)


def test_fedit_needs_ten_clients_and_partitioners_split_the_pool():
    settings = causal_config().data
    with pytest.raises(ConfigError, match=r"federation\.clients"):
        instruct_data.client_partition(settings, 0, 4, 0)
    settings.partition = "dirichlet"
    parts = [instruct_data.client_partition(settings, pid, 4, 0) for pid in range(4)]
    assert sum(len(p) for p in parts) == 15_011 - 80  # the whole training pool, no test record
    assert not any("test" in p["split"] for p in parts)
    with pytest.raises(ConfigError, match=r"data\.dataset"):
        instruct_data.instruct_spec("sst2")


def test_missing_or_bad_data_file_is_named(tmp_path):
    import gzip

    from copra_core.data import DataFileError

    settings = causal_config(**{"data.dir": str(tmp_path)}).data
    with pytest.raises(DataFileError, match=r"dolly15k\.jsonl\.gz.*data\.dir"):
        instruct_data.test_split(settings)
    (tmp_path / "dolly").mkdir()
    good = {"instruction": "i", "context": "", "response": "r", "category": "open_qa", "split": "test"}
    with gzip.open(tmp_path / "dolly" / "dolly15k.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(good) + "\n" + json.dumps({**good, "split": "client_12"}) + "\n")
    with pytest.raises(ValueError, match=r"dolly15k\.jsonl\.gz:2: unknown split 'client_12'"):
        instruct_data.test_split(settings)


def test_generation_prompts_are_one_per_category():
    records = instruct_data.generation_records(causal_config().data, 8)
    assert len(set(records["category"])) == 8


# ---------------------------------------------------------------------- formatting and masking
def test_prompt_tokens_are_masked_and_response_learned(task):
    record = {"instruction": "Name a colour.", "context": "", "response": "Blue is a colour."}
    example = task.encode(**record)
    prompt = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label == -100]
    learned = [label for label in example["labels"] if label != -100]
    # The masked part is exactly the prompt (ends with the assistant header), the rest the response.
    assert task.tokenizer.decode(prompt) == task.render_prompt(record["instruction"], "")
    assert task.render_prompt("x", "").endswith("<|im_start|>assistant\n")
    assert task.tokenizer.decode(learned).startswith("Blue is a colour.<|im_end|>")  # the model learns to stop
    assert example["input_ids"][len(prompt) :] == learned


def test_long_context_is_cut_not_the_response(task):
    max_length = task.config.model.max_length
    long_context = " ".join(f"word{i}" for i in range(400))
    example = task.encode("Summarise.", long_context, "A short list of words, many of them.")
    learned = [label for label in example["labels"] if label != -100]
    assert len(example["input_ids"]) <= max_length
    assert task.tokenizer.decode(learned).startswith("A short list of words")
    assert "word0 word1" in task.tokenizer.decode(example["input_ids"])  # the context's start is kept


def test_plain_template_and_bad_settings():
    from copra_core.tasks import build_task

    plain = build_task(causal_config(**{"causal-lm.template": "plain"}))
    prompt = plain.render_prompt("Do it.", "Some context.")
    assert "### Instruction:\nDo it." in prompt and prompt.endswith("### Response:\n")
    with pytest.raises(ConfigError, match=r"causal\-lm\.min\-response\-tokens"):
        build_task(causal_config(**{"causal-lm.min-response-tokens": 64}))
    with pytest.raises(ConfigError, match=r"causal\-lm\.generation\-rounds"):
        build_task(causal_config(**{"causal-lm.generation-rounds": "1,final"}))
    with pytest.raises(FileNotFoundError, match=r"model\.name"):
        build_task(causal_config(**{"model.name": "/nonexistent/model.gguf"}))


def test_collate_pads_right_with_ignored_labels(task):
    examples = [task.encode("Hi.", "", "Hello there, friend."), task.encode("Name a fruit.", "", "Apple.")]
    batch = task.collate(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    short = lengths.index(min(lengths))
    assert batch["attention_mask"][short, min(lengths) :].sum() == 0
    assert (batch["labels"][short, min(lengths) :] == -100).all()
    assert batch["input_ids"].shape[1] == max(lengths)


# ---------------------------------------------------------------------- model, loss, generation
def test_gguf_model_is_a_plain_fp32_model_with_blocks_found(task, peft_model):
    import gguf

    from copra_core.lora import find_block_list, lora_layers_by_block

    assert not getattr(peft_model.base_model.model, "is_quantized", False)
    assert {p.dtype for p in peft_model.parameters()} == {torch.float32}
    prefix, blocks = find_block_list(peft_model)
    assert prefix.endswith("model.layers") and len(blocks) == 2
    assert all(
        {type(m).__name__ for m in group} == {"Linear"} and len(group) == 2
        for group in lora_layers_by_block(peft_model)
    )
    per_block = sum(p.numel() for p in peft_model.parameters() if p.requires_grad) // 2
    # The untruncated model's block count, from the GGUF header (gguf's reader maps the file lazily).
    field = gguf.GGUFReader(Path(task.model_path) / task.gguf_file).fields["llama.block_count"]
    num_blocks = int(field.parts[field.data[0]][0])
    assert num_blocks == 30
    assert per_block * num_blocks == 460_800  # LoRA r = 8 on q_proj/v_proj of all 30 blocks


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_decoder_families_from_a_local_folder(task, family, tmp_path):
    """A Hugging Face causal LM given by path: loaded, LoRA on q_proj/v_proj, blocks found structurally.

    Tiny random-weight models of two other families, saved with SmolLM2's tokenizer (no
    internet here for real checkpoints); the task code is the same as for the default.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from copra_core.lora import build_peft_model, lora_layers_by_block
    from copra_core.tasks import build_task

    tiny = AutoConfig.for_model(
        family,
        vocab_size=len(task.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny).save_pretrained(tmp_path)
    task.tokenizer.save_pretrained(tmp_path)
    other = build_task(causal_config(**{"model.name": str(tmp_path), "model.num-hidden-layers": 0}))
    assert other.gguf_file is None
    base, new_modules = other.load_model()
    assert base.config.model_type == family and new_modules == []
    model = build_peft_model(base, other.config.lora, new_modules, seed=0)
    blocks = lora_layers_by_block(model)
    assert len(blocks) == 3 and all(len(group) == 2 for group in blocks)  # q_proj and v_proj per block
    batch = other.collate([other.encode("Name a colour.", "", "Blue.")])
    loss, stats = other.batch_stats(model, batch)
    assert math.isfinite(float(loss)) and stats["tokens"] > 0


def test_loss_is_hf_loss_on_response_tokens(task, peft_model):
    examples = [task.encode("Name a colour.", "", "Blue."), task.encode("Count to three.", "", "One, two, three.")]
    batch = task.collate(examples)
    with torch.no_grad():
        loss, stats = task.batch_stats(peft_model, batch)
        reference = peft_model(**batch).loss  # transformers' own shifted, -100-masked mean
    assert float(loss) == pytest.approx(float(reference), rel=1e-5)
    learned = sum(sum(label != -100 for label in e["labels"]) for e in examples)
    assert stats["tokens"] == learned
    summary = task.summarise(stats)
    assert summary["perplexity"] == pytest.approx(math.exp(summary["loss"]))
    # Token accuracy: the shifted logits' argmax against the response labels, counted here.
    with torch.no_grad():
        predicted = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    targets = batch["labels"][:, 1:]
    hits = (predicted[:, :-1] == targets)[targets != -100]
    assert summary["token_accuracy"] == pytest.approx(float(hits.float().mean()), abs=1e-12)


def test_bf16_autocast_keeps_fp32_weights_and_close_loss(peft_model):
    from copra_core.tasks import build_task

    bf16 = build_task(causal_config(**{"causal-lm.autocast": "bf16"}))
    batch = bf16.collate([bf16.encode("Name a colour.", "", "Blue is one.")])
    with torch.no_grad():
        loss_bf16, _ = bf16.batch_stats(peft_model, batch)
        loss_fp32, _ = build_task(causal_config(**{"causal-lm.autocast": "off"})).batch_stats(peft_model, batch)
    assert float(loss_bf16) == pytest.approx(float(loss_fp32), rel=0.05)
    assert float(loss_bf16) != float(loss_fp32)  # autocast really changed the arithmetic
    assert {p.dtype for p in peft_model.parameters()} == {torch.float32}


def test_gradient_checkpointing_gives_the_same_gradients(task, peft_model):
    """The mechanism causal-lm.gradient-checkpointing switches on (non-reentrant, frozen embeddings)."""
    batch = task.collate([task.encode("Name a colour.", "", "Blue is one."), task.encode("Hi.", "", "Hello.")])
    base = peft_model.base_model.model

    calls = []
    # transformers checkpoints the block's forward (not __call__), and torch stops a recompute
    # once it has what backward needs: count the start of the block's first module.
    hook = base.model.layers[0].input_layernorm.register_forward_pre_hook(lambda *args: calls.append(1))

    def lora_grads() -> tuple[dict[str, torch.Tensor], int]:
        calls.clear()
        peft_model.zero_grad(set_to_none=True)
        loss, _ = task.batch_stats(peft_model, batch)
        loss.backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}, len(calls)

    peft_model.train()
    try:
        plain, plain_calls = lora_grads()
        enable_checkpointing(base)
        checkpointed, checkpointed_calls = lora_grads()
    finally:
        hook.remove()
        base.activation_checkpointing_disable()  # the fixture's model is shared: leave it as it was
        peft_model.zero_grad(set_to_none=True)
        peft_model.eval()
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the block's forward really ran again in backward
    assert plain.keys() == checkpointed.keys() and len(plain) == 8  # q and v, A and B, 2 blocks
    assert any(float(g.abs().sum()) > 0 for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_batched_generation_equals_one_by_one(task, peft_model):
    """Left padding: a short prompt's answer in a batch equals its answer alone."""
    records = task.generation_set()
    assert len(records) == 2
    together = task.generate(peft_model, records, batch_size=2)
    alone = [task.generate(peft_model, [r], batch_size=1)[0] for r in records]
    assert together == alone


# ---------------------------------------------------------------------- ROUGE-L
def words(text: str) -> list[str]:
    """ROUGE's tokenisation (Lin 2004): lower case, runs of anything but [a-z0-9] separate tokens."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(reference: list[str], candidate: list[str]) -> float:
    """ROUGE-L F1 from the longest common subsequence, by dynamic programming (written for this test)."""
    previous = [0] * (len(candidate) + 1)
    for ref_token in reference:
        current = [0]
        for j, cand_token in enumerate(candidate):
            current.append(previous[j] + 1 if ref_token == cand_token else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


#: (reference, answer, ROUGE-L F1 by hand, the tokens after Porter stemming of words over 3 letters).
ROUGE_CASES = [
    ("Blue is a colour.", "blue is a COLOUR", 1.0, None),
    ("Paris.", "London", 0.0, None),
    # LCS the cat on mat = 4 of 6 and 6 tokens: P = R = 4/6.
    ("The cat sat on the mat.", "the cat was on a mat", 2 / 3, None),
    # Stemmed: the quick brown fox jump over the lazi dog / the fox jump over the dog: LCS 6 of 9 and 6,
    # P = 1, R = 2/3, F = 4/5. Unstemmed 'jumps' and 'jumped' differ: LCS 5, F = 2 (5/6)(5/9) / (25/18) = 2/3.
    (
        "The quick brown fox jumps over the lazy dog.",
        "The fox jumped over the dog",
        4 / 5,
        (
            ["the", "quick", "brown", "fox", "jump", "over", "the", "lazi", "dog"],
            ["the", "fox", "jump", "over", "the", "dog"],
        ),
    ),
]


def test_rouge_l_of_the_generations_is_the_lcs_f1_with_stemming(task, tmp_path, monkeypatch):
    """The task's scoring path (after_round) against ROUGE-L computed here on hand-checked cases."""
    for reference, answer, by_hand, stemmed in ROUGE_CASES:
        assert rouge_l(*(stemmed or (words(reference), words(answer)))) == pytest.approx(by_hand, abs=1e-12)
    assert rouge_l(words(ROUGE_CASES[3][0]), words(ROUGE_CASES[3][1])) == pytest.approx(2 / 3)  # no stemming
    records = [
        {"instruction": f"q{i}", "context": "", "response": r, "category": "c"} for i, (r, *_) in enumerate(ROUGE_CASES)
    ]
    monkeypatch.setattr(task, "generation_set", lambda: records)
    monkeypatch.setattr(task, "generate", lambda model, recs: [answer for _, answer, *_ in ROUGE_CASES])
    rounds = int(task.config.federation.rounds)
    metrics = task.after_round(None, rounds, rounds, tmp_path)
    expected = [by_hand for _, _, by_hand, _ in ROUGE_CASES]
    assert metrics["generation/rougeL"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    saved = json.loads((tmp_path / "generations.json").read_text())
    assert saved["rounds"][str(rounds)]["rougeL_each"] == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------- end to end through Flower
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("causal")
    out = tmp / "run"
    args = ["simulate", "--task", "causal_lm", "--quick", "--out", str(out), "--no-display"]
    proc = run_tagged([sys.executable, "-m", "simulations.cli", *args], tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.e2e
def test_quick_causal_run_writes_metrics_generations_and_report(quick_run):
    rows = [json.loads(line) for line in (quick_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert math.isfinite(row["global/loss"])
        assert row["global/perplexity"] == pytest.approx(math.exp(row["global/loss"]), rel=1e-9)
    for row in rows[1:]:
        assert row["clients/sampled"] == 2  # 2 of the 10 FedIT clients per round
        assert all(isinstance(row[k], float) for k in ("barrier/jensen_factor", "barrier/pairwise_max"))
    assert "generation/rougeL" not in rows[0]
    saved = json.loads((quick_run / "generations.json").read_text())
    assert sorted(saved["rounds"]) == ["1", "2"]
    for rnd, result in saved["rounds"].items():
        assert len(result["answers"]) == len(saved["prompts"]) == 2 and all(result["answers"]), result
        # Stemming only merges tokens, so each score is at least the unstemmed LCS F1 computed
        # here, and at most 1; the row's figure is their mean.
        for prompt, answer, score in zip(saved["prompts"], result["answers"], result["rougeL_each"], strict=True):
            assert rouge_l(words(prompt["response"]), words(answer)) - 1e-12 <= score <= 1.0, (answer, score)
        assert result["rougeL"] == pytest.approx(sum(result["rougeL_each"]) / 2, abs=1e-12)
        assert rows[int(rnd)]["generation/rougeL"] == pytest.approx(result["rougeL"], abs=1e-12)
    report = (quick_run / "report.md").read_text()
    assert "Generations on fixed test prompts" in report and "| round 1 | round 2 |" in report
    assert "perplexity" in report


@pytest.mark.e2e
def test_exported_adapter_reloads_and_generates_the_runs_text(quick_run, task, pretrained):
    """PeftModel.from_pretrained on the dequantised base: the run's last-round texts and loss."""
    from copra_core.training import evaluate

    config = task.config  # the run's: the causal_lm-quick scenario
    model = PeftModel.from_pretrained(copy.deepcopy(pretrained[0]), str(quick_run / "adapter")).eval()
    saved = json.loads((quick_run / "generations.json").read_text())
    assert task.generate(model, task.generation_set()) == saved["rounds"]["2"]["answers"]
    rows = [json.loads(line) for line in (quick_run / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[-1]["global/loss"] - rows[0]["global/loss"]) > 1e-3  # the loss check can tell the adapter
    examples = task.server_examples(config.data.eval_size)
    result = evaluate(model, task, task.eval_batches(examples, config.diagnostics.batch_size), torch.device("cpu"))
    assert result["loss"] == pytest.approx(rows[-1]["global/loss"], rel=1e-5)


@pytest.mark.e2e
def test_benchmark_reuses_a_run_only_of_the_same_config(quick_run):
    from benchmarks.causal_lm import QUICK, finished_run_matches, run_config

    assert finished_run_matches(quick_run, run_config("copra", QUICK, 0, quick_run))
    with pytest.raises(ValueError, match=r"copra\.enabled"):
        finished_run_matches(quick_run, run_config("lora", QUICK, 0, quick_run))
    assert not finished_run_matches(quick_run / "missing", run_config("copra", QUICK, 0, quick_run))
