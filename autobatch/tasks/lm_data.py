"""The causal-LM task's data: JSONL records, their tokens, micro-batches and the summed loss.

Each JSONL line is ``{"text": ...}`` (every token is a target) or ``{"prompt": ...,
"completion": ...}`` (only the completion's tokens are targets). A sample is its token
ids and labels (-100 where a token is not a target); a micro-batch is its samples
right-padded to the longest; its loss is the SUM of its target tokens' cross-entropies
(invariant 3 of docs/design.md: the accumulator weighs it by the global batch's
target-token count).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autobatch.errors import CausalLMError
from autobatch.tasks.losses import IGNORE_INDEX, next_token_loss_sum

Sample = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Record:
    """One JSONL line: `prompt` is None for a {"text": ...} line."""

    prompt: str | None
    completion: str


@dataclass(frozen=True)
class Tokenized:
    samples: list[Sample]
    dropped: int
    truncated: int


# ---------------------------------------------------------------------------
# samples, micro-batches and the loss


def item_count(sample: Sample) -> int:
    """Target tokens of a sample after the causal shift."""
    return int((sample["labels"][1:] != IGNORE_INDEX).sum())


def sample_length(sample: Sample) -> int:
    """Tokens the sample occupies in a micro-batch."""
    return len(sample["input_ids"])


def collate(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample of the micro-batch; pads are masked and not targets."""
    width = max(sample_length(s) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = sample_length(s)
        ids[i, :n] = s["input_ids"]
        labels[i, :n] = s["labels"]
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """SUM of next-token cross-entropies over the target tokens (labels != -100).

    The model gets no labels: Hugging Face's built-in loss is a per-batch mean, which
    weighs micro-batches wrongly under accumulation. The loss is computed in at least
    float32 (float64 stays float64)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return next_token_loss_sum(out.logits if hasattr(out, "logits") else out[0], batch["labels"])


# ---------------------------------------------------------------------------
# reading and tokenizing the data


def read_jsonl(path: str | Path, *, max_samples: int | None = None) -> list[Record]:
    """The records of a JSONL file, checked line by line (blank lines are skipped)."""
    p = Path(path)
    if not p.is_file():
        raise CausalLMError(f"data={str(path)!r}: no such file")
    records: list[Record] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if max_samples is not None and len(records) >= max_samples:
                break
            if line.strip():
                records.append(_record(line, f"{p.name}:{lineno}"))
    if not records:
        raise CausalLMError(
            f"data={str(path)!r}: the file has no samples; {_ALLOWED_LINES}, one a line"
        )
    return records


_ALLOWED_LINES = 'expected {"text": ...} or {"prompt": ..., "completion": ...}'


def _record(line: str, where: str) -> Record:
    """One line of the file (`where`: file:line, for the message)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:  # its message is in ours: one line, no traceback
        raise CausalLMError(f"{where}: not valid JSON ({exc.msg}); {_ALLOWED_LINES}") from None
    if not isinstance(obj, dict):
        raise CausalLMError(f"{where}: {_ALLOWED_LINES}, got a JSON {type(obj).__name__}")
    keys = sorted(obj)
    if keys not in (["text"], ["completion", "prompt"]):
        raise CausalLMError(f"{where}: {_ALLOWED_LINES}, got keys {keys}")
    for key in keys:
        if not isinstance(obj[key], str):
            raise CausalLMError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    return Record(obj.get("prompt"), obj.get("text", obj.get("completion")))


def tokenize(records: Sequence[Record], tokenizer: Any, max_seq_len: int) -> Tokenized:
    """Token ids and labels per record: [BOS] prompt completion [EOS], prompt masked out.

    BOS is added where the tokenizer adds one itself, EOS where it has one. Samples
    longer than `max_seq_len` keep their beginning; a sample left with no target token
    after the causal shift is dropped (and counted)."""
    prefix = _bos_prefix(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts = _encode(tokenizer, [r.prompt or "" for r in records])
    completions = _encode(tokenizer, [r.completion for r in records])
    samples, dropped, truncated = [], 0, 0
    for prompt, completion in zip(prompts, completions):
        context = prefix + prompt
        ids = torch.tensor(context + completion + eos, dtype=torch.long)
        labels = ids.clone()
        labels[: len(context)] = IGNORE_INDEX
        if len(ids) > max_seq_len:
            ids, labels, truncated = ids[:max_seq_len], labels[:max_seq_len], truncated + 1
        sample = {"input_ids": ids, "labels": labels}
        if item_count(sample) == 0:
            dropped += 1
        else:
            samples.append(sample)
    return Tokenized(samples, dropped, truncated)


def pad_id(tokenizer: Any) -> int:
    """The token a micro-batch is padded with: the tokenizer's pad, else its EOS, else 0."""
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    return 0


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def _bos_prefix(tokenizer: Any) -> list[int]:
    """[BOS] if the tokenizer puts one in front of a text by itself, else []."""
    bos = tokenizer.bos_token_id
    specials = tokenizer("", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and specials[:1] == [bos] else []
