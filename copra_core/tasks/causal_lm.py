"""Causal-LM instruction tuning (Dolly-15k by default) on a decoder LLM.

* Records are rendered with the tokenizer's chat template (``causal-lm.template=chat``)
  or a plain '### Instruction' format; the loss covers the response tokens only (prompt
  tokens get label -100), including the end-of-turn token, so the model learns to stop.
* Batches are grouped by length (``Task.train_batches``) rather than packed: packing
  would let attention cross record boundaries unless every model supported per-record
  masks, and length grouping already removes most padding.
* Training pads on the right (labels -100, attention mask 0); generation pads on the
  left, as decoder-only generation needs. A tokenizer without a pad token pads with its
  end-of-sequence token (masked everywhere, so its identity does not matter; a new token
  would need a new, untrained embedding row).
* Metrics: token-weighted loss on response tokens, perplexity ``exp(loss)`` and next-token
  accuracy on response tokens (the headline metric: higher is better, as the report
  expects). The loss drives the barrier diagnostics. After chosen rounds the server's
  global adapter answers fixed test prompts greedily; ROUGE-L (``rouge-score``, the
  reference implementation's Python port) against the reference responses goes into the
  round's row and the generations into the report, side by side per round.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from copra_core.config import ConfigError, RunConfig, split_csv
from copra_core.model_loading import load_pretrained, quiet_transformers, resolve_causal_lm
from copra_core.tasks import instruct_data
from copra_core.tasks.base import Batch, LazyEncoded, Task

Example = dict[str, list[int]]
IGNORE = -100
GENERATIONS_JSON = "generations.json"
GENERATIONS_MD = "generations.md"


@lru_cache(maxsize=2)
def load_tokenizer(model_path: str, gguf_file: str | None) -> PreTrainedTokenizerBase:
    """The model's tokenizer, once per process (a GGUF tokenizer takes seconds to convert)."""
    with quiet_transformers():
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(model_path, **kwargs)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer of '{model_path}' has neither a pad nor an end-of-sequence token.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # training; generation asks for left padding explicitly
    return tokenizer


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every block (works with frozen embeddings, as LoRA has).

    transformers >= 5.x names it ``activation_checkpointing_enable`` and deprecates
    ``gradient_checkpointing_enable``; older releases have only the latter. The KV cache is
    left on: checkpointed blocks drop it themselves while training, and generation needs it.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _truncate_text(tokenizer: PreTrainedTokenizerBase, text: str, drop: int) -> str:
    """``text`` with its last ``drop`` tokens removed (by the model's own tokenizer)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[: max(len(ids) - drop, 0)])


class CausalLMTask(Task):
    name: ClassVar[str] = "causal_lm"
    metric: ClassVar[str] = "token_accuracy"

    def __init__(self, config: RunConfig) -> None:
        # Not Task.__init__: 'default' means the default decoder here, and GGUF files need a file name.
        self.config = config
        self.model_path, self.gguf_file = resolve_causal_lm(config.model.name)
        settings = config.causal_lm
        if settings.min_response_tokens >= config.model.max_length:
            raise ConfigError(
                f"Config key 'causal-lm.min-response-tokens' ({settings.min_response_tokens}) must be smaller "
                f"than model.max-length ({config.model.max_length})."
            )
        self._rounds = split_csv(settings.generation_rounds)
        for item in self._rounds:
            if item != "last" and not item.isdigit():
                raise ConfigError(
                    f"Config key 'causal-lm.generation-rounds': '{item}' is neither a round number nor 'last'."
                )
        instruct_data.instruct_spec(config.data.dataset)  # a wrong dataset fails at construction

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.model_path, self.gguf_file)

    # ------------------------------------------------------------------ model
    def load_model(self) -> tuple[nn.Module, list[str]]:
        model, new_modules = load_pretrained(AutoModelForCausalLM, self.model_path, self.config.model, self.gguf_file)
        tokenizer = self.tokenizer
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        if self.config.causal_lm.gradient_checkpointing:
            enable_checkpointing(model)
        return model, new_modules

    # ------------------------------------------------------------------ formatting
    def _messages(self, instruction: str, context: str) -> list[dict[str, str]]:
        system = self.config.causal_lm.system_prompt
        user = f"{instruction}\n\n{context}" if context else instruction
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]

    def render_prompt(self, instruction: str, context: str) -> str:
        """The prompt text up to where the response starts (what generation is given)."""
        tokenizer = self.tokenizer
        if self.config.causal_lm.template == "plain":
            system = self.config.causal_lm.system_prompt
            parts = [system] if system else []
            parts.append(f"### Instruction:\n{instruction}")
            if context:
                parts.append(f"### Context:\n{context}")
            parts.append("### Response:\n")
            return (tokenizer.bos_token or "") + "\n\n".join(parts)
        if not tokenizer.chat_template:
            raise ConfigError(
                f"Config key 'causal-lm.template' is 'chat' but the tokenizer of '{self.config.model.name}' "
                "has no chat template; use causal-lm.template=plain."
            )
        return tokenizer.apply_chat_template(
            self._messages(instruction, context), tokenize=False, add_generation_prompt=True
        )

    def render_response(self, instruction: str, context: str, response: str) -> str:
        """The text that follows the prompt in a full training record (response + end of turn)."""
        tokenizer = self.tokenizer
        if self.config.causal_lm.template == "plain":
            return response + (tokenizer.eos_token or "")
        prompt = self.render_prompt(instruction, context)
        messages = [*self._messages(instruction, context), {"role": "assistant", "content": response}]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(
                f"The chat template of '{self.config.model.name}' does not render the prompt as a prefix of the "
                "full conversation, so prompt tokens cannot be masked; use causal-lm.template=plain."
            )
        return full[len(prompt) :]

    def _prompt_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def fit_prompt(self, instruction: str, context: str, room: int) -> list[int]:
        """Prompt token ids of at most ``room`` tokens: the context cut first, then the instruction.

        Cut at token boundaries of the model's tokenizer and re-rendered through the template,
        so the template's own tokens are never cut.
        """
        prompt_ids = self._prompt_ids(self.render_prompt(instruction, context))
        for _ in range(4):  # re-tokenising at a cut can shift a token or two: a few passes converge
            overflow = len(prompt_ids) - room
            if overflow <= 0:
                return prompt_ids
            if context:
                context = _truncate_text(self.tokenizer, context, overflow)
            else:
                instruction = _truncate_text(self.tokenizer, instruction, overflow)
            prompt_ids = self._prompt_ids(self.render_prompt(instruction, context))
        if len(prompt_ids) > room:
            raise ConfigError(
                f"Config key 'model.max-length' ({self.config.model.max_length}) is too small: the prompt "
                f"template alone takes {len(prompt_ids)} tokens and causal-lm.min-response-tokens wants "
                f"{self.config.causal_lm.min_response_tokens} more."
            )
        return prompt_ids

    def encode(self, instruction: str, context: str, response: str) -> Example:
        """Token ids and labels of one record, at most ``model.max-length`` tokens.

        Labels are -100 on the prompt. A prompt that leaves fewer than
        ``causal-lm.min-response-tokens`` for the response is cut (``fit_prompt``); the
        response is then cut to fit. Every example so carries response tokens, none is dropped.
        """
        max_length = self.config.model.max_length
        response_ids = self._prompt_ids(self.render_response(instruction, context, response))
        room = max_length - min(len(response_ids), self.config.causal_lm.min_response_tokens)
        prompt_ids = self.fit_prompt(instruction, context, room)
        response_ids = response_ids[: max_length - len(prompt_ids)]
        return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE] * len(prompt_ids) + response_ids}

    # ------------------------------------------------------------------ data
    def _encode(self, dataset) -> LazyEncoded:
        instructions, contexts, responses = (dataset[c][:] for c in ("instruction", "context", "response"))
        return LazyEncoded(len(responses), lambda i: self.encode(instructions[i], contexts[i], responses[i]))

    def client_examples(self, partition_id: int, num_partitions: int) -> tuple[Sequence, Sequence]:
        train, val = instruct_data.client_splits(self.config.data, partition_id, num_partitions, self.config.seed)
        return self._encode(train), self._encode(val)

    def server_examples(self, size: int) -> Sequence:
        return self._encode(instruct_data.server_eval_split(self.config.data, self.config.seed, size))

    def calibration_examples(self, size: int) -> Sequence:
        return self._encode(instruct_data.calibration_split(self.config.data, self.config.seed, size))

    def check_inputs(self, num_partitions: int) -> None:
        instruct_data.check_partitioning(self.config.data, num_partitions)
        instruct_data.test_split(self.config.data)  # reads and checks the data file
        self.render_prompt("x", "")  # a missing chat template fails here

    def collate(self, examples: Sequence[Example]) -> Batch:
        # transformers' collator pads input_ids/attention_mask with the pad token and labels with -100.
        collator = DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=IGNORE, return_tensors="pt")
        return dict(collator([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]))

    # ------------------------------------------------------------------ loss / metric
    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """bf16 autocast per ``causal-lm.autocast`` (auto: on CUDA only); weights stay fp32."""
        mode = self.config.causal_lm.autocast
        enabled = mode == "bf16" or (mode == "auto" and device.type == "cuda")
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)

    def batch_stats(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch["labels"]
        with self._autocast(labels.device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = labels[:, 1:]
        mask = targets != IGNORE
        # Only response positions: the cross entropy over the 49k-word vocabulary is the costly part.
        selected = logits[:, :-1][mask].float()
        wanted = targets[mask]
        tokens = int(mask.sum())
        if tokens == 0:
            loss = logits.sum() * 0.0  # keeps the graph; cannot happen with min-response-tokens > 0
            return loss, {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0, "count": float(len(labels))}
        loss_sum = nn.functional.cross_entropy(selected, wanted, reduction="sum")
        stats = {
            "loss_sum": float(loss_sum.detach()),
            "correct": float((selected.detach().argmax(-1) == wanted).sum()),
            "tokens": float(tokens),
            "count": float(len(labels)),
        }
        return loss_sum / tokens, stats

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        tokens = max(sums.get("tokens", 0.0), 1.0)
        loss = sums.get("loss_sum", 0.0) / tokens
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),  # capped: exp overflows for a diverged model
            "token_accuracy": sums.get("correct", 0.0) / tokens,
        }

    # ------------------------------------------------------------------ generation
    def generation_set(self) -> list[dict[str, str]]:
        """The fixed test records answered after the chosen rounds (``causal-lm.generation-prompts``)."""
        records = instruct_data.generation_records(self.config.data, self.config.causal_lm.generation_prompts)
        return [dict(r) for r in records]

    @torch.no_grad()
    def generate(self, model: nn.Module, records: Sequence[dict[str, str]], batch_size: int = 8) -> list[str]:
        """Greedy answers of ``model`` to ``records`` (left-padded batches, prompt as in training)."""
        tokenizer = self.tokenizer
        device = next(model.parameters()).device
        model.eval()
        # Prompts longer than training allows are cut as in training (the response's share reserved).
        room = self.config.model.max_length - self.config.causal_lm.min_response_tokens
        prompts = [self.fit_prompt(r["instruction"], r["context"], room) for r in records]
        answers: list[str] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": chunk}, padding_side="left", return_tensors="pt").to(device)
            with self._autocast(device):
                out = model.generate(
                    **batch,
                    max_new_tokens=self.config.causal_lm.max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return answers

    def generation_rounds(self, num_rounds: int) -> set[int]:
        return {num_rounds if item == "last" else int(item) for item in self._rounds}

    def after_round(self, model: nn.Module, server_round: int, num_rounds: int, out_dir: Path) -> dict[str, float]:
        """Generate on the fixed prompts after the chosen rounds; ROUGE-L into the row, texts into files."""
        if not self.config.causal_lm.generation_prompts or server_round not in self.generation_rounds(num_rounds):
            return {}
        from rouge_score import rouge_scorer

        from copra_core.reporting import atomic_write_text  # imported here: clients need no matplotlib

        records = self.generation_set()
        answers = self.generate(model, records)
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        scores = [scorer.score(r["response"], a)["rougeL"].fmeasure for r, a in zip(records, answers, strict=True)]
        rouge = sum(scores) / len(scores)
        path = Path(out_dir) / GENERATIONS_JSON
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        saved["prompts"] = [{k: r[k] for k in ("instruction", "context", "response", "category")} for r in records]
        saved.setdefault("rounds", {})[str(server_round)] = {"rougeL": rouge, "answers": answers, "rougeL_each": scores}
        atomic_write_text(path, json.dumps(saved, indent=1, ensure_ascii=False))
        atomic_write_text(Path(out_dir) / GENERATIONS_MD, generations_markdown(saved))
        return {"generation/rougeL": rouge}


def _cell(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def generations_markdown(saved: dict[str, Any]) -> str:
    """Side-by-side table: prompt, reference and each generating round's answer with its ROUGE-L."""
    rounds = sorted(saved.get("rounds", {}), key=int)
    lines = [
        "## Generations on fixed test prompts",
        "",
        "Greedy decoding by the global adapter after each listed round; ROUGE-L F1 (rouge-score, "
        "stemmed) against the reference response. Long texts are cut in this table; "
        f"`{GENERATIONS_JSON}` has them in full.",
        "",
        "| round | mean ROUGE-L |",
        "|---|---|",
        *(f"| {r} | {saved['rounds'][r]['rougeL']:.4f} |" for r in rounds),
        "",
        "| category | instruction | reference | " + " | ".join(f"round {r}" for r in rounds) + " |",
        "|" + "---|" * (3 + len(rounds)),
    ]
    for i, prompt in enumerate(saved.get("prompts", [])):
        instruction = prompt["instruction"] + (f" [context: {prompt['context']}]" if prompt["context"] else "")
        answers = [
            f"{_cell(saved['rounds'][r]['answers'][i])} (R-L {saved['rounds'][r]['rougeL_each'][i]:.2f})"
            for r in rounds
        ]
        row = [prompt["category"], _cell(instruction, 200), _cell(prompt["response"]), *answers]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
