"""The built-in Hugging Face causal-LM task: a local model directory and a JSONL file.

    task: causal_lm
    max_seq_len: 512
    task_args: {model_dir: ./model, data: ./data.jsonl, lora: {r: 8}}

Each JSONL line is ``{"text": ...}`` (every token is a target) or ``{"prompt": ...,
"completion": ...}`` (only the completion's tokens are targets). The data is tokenized
once, when the task is built. A micro-batch's loss is the SUM of its target tokens'
cross-entropies, so the accumulator's weighting by the global batch's target-token
count gives the full-batch token-mean gradient (invariant 3 of docs/design.md) however
unevenly lengths and padding fall on ranks and micro-batches.

This module builds the task; its data (records, tokens, micro-batches, the loss) is in
`autobatch.tasks.lm_data`, its model (loading, checks, the optional imports) in
`autobatch.tasks.hf_model`; their names are importable from here as well.

transformers, tokenizers and peft are optional (``pip install 'autobatch[hf]'``) and
imported only inside the functions that need them. Nothing is ever downloaded: models
and tokenizers load from local directories (``local_files_only=True``).

A tiny random model and example data to try it on: `autobatch.tasks.lm_example`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autobatch.errors import CausalLMError, LoraError
from autobatch.tasks.hf_model import (
    DTYPES,
    INSTALL_HINT,
    check_model_dir,
    enable_gradient_checkpointing,
    load_model,
    load_tokenizer,
    require_hf,
    unwrap,
)
from autobatch.tasks.lm_data import (
    Record,
    Sample,
    Tokenized,
    collate,
    item_count,
    pad_id,
    read_jsonl,
    sample_length,
    token_loss_sum,
    tokenize,
)
from autobatch.tasks.lora import LoraSpec, lora_settings
from autobatch.tasks.task import Task

__all__ = [
    "DTYPES",
    "INSTALL_HINT",
    "CausalLMError",
    "CausalLMTask",
    "Record",
    "Sample",
    "Tokenized",
    "causal_lm_task",
    "collate",
    "enable_gradient_checkpointing",
    "item_count",
    "load_model",
    "read_jsonl",
    "require_hf",
    "sample_length",
    "token_loss_sum",
    "tokenize",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CausalLMTask(Task):
    """A `Task` that also holds its tokenizer and what tokenization left out."""

    tokenizer: Any = field(default=None, repr=False, compare=False)
    dropped_samples: int = 0  # no target token left after truncation and the causal shift
    truncated_samples: int = 0  # longer than max_seq_len: cut to their first max_seq_len tokens

    def probe_batch(self, size: int) -> dict[str, torch.Tensor]:
        """`size` worst-case sequences, one of them a token shorter when size > 1: a batch
        with padding takes the attention-mask path (a materialised mask, no fused causal
        kernel), as real batches of uneven lengths do; it needs about a third more memory
        on the tiny GPT-2, so probing without padding would plan micro-batches that OOM."""
        worst = self.worst_case_sample()
        if size == 1:
            return self.collate([worst])
        shorter = {k: v[:-1] for k, v in worst.items()}
        return self.collate([worst] * (size - 1) + [shorter])


def causal_lm_task(
    *,
    model_dir: str,
    data: str,
    max_seq_len: int,
    lora: LoraSpec | dict[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    dtype: str = "float32",
    max_samples: int | None = None,
    seed: int = 0,
) -> CausalLMTask:
    """A causal LM from a local directory, fine-tuned on a JSONL file, per-token loss.

    `lora` ({r, alpha, dropout, target_modules}) trains a LoRA adapter instead of the
    full model. `max_samples` keeps the first that many lines. `seed` is accepted for
    symmetry with other tasks: the data order is the sampler's, and the weights the
    directory's (a LoRA adapter's init follows the seed the launcher sets per rank).
    """
    del seed  # nothing here is random
    lora_config = _check_settings(max_seq_len, dtype, max_samples, lora)
    model_path = check_model_dir(model_dir, max_seq_len)
    tokenizer = load_tokenizer(model_path)
    records = read_jsonl(data, max_samples=max_samples)
    tokenized = tokenize(records, tokenizer, max_seq_len)
    if not tokenized.samples:
        raise CausalLMError(
            f"data={data!r}: all {tokenized.dropped} samples have no target token within "
            f"max_seq_len={max_seq_len} (a prompt fills it): raise max_seq_len"
        )
    if tokenized.dropped:
        log.warning(
            "%s: dropped %d of %d samples with no target token within max_seq_len=%d",
            data,
            tokenized.dropped,
            len(records),
            max_seq_len,
        )
    pad = pad_id(tokenizer)
    longest = max(tokenized.samples, key=sample_length)["input_ids"]
    worst = longest.repeat(math.ceil(max_seq_len / len(longest)))[:max_seq_len].clone()

    def build_model() -> nn.Module:
        return load_model(
            model_path,
            dtype=dtype,
            lora=lora_config,
            gradient_checkpointing=gradient_checkpointing,
        )

    def save(model: nn.Module, out_dir: str) -> None:
        unwrap(model).save_pretrained(out_dir)  # a PEFT model writes only its adapter
        tokenizer.save_pretrained(out_dir)

    return CausalLMTask(
        build_model=build_model,
        dataset=tokenized.samples,
        collate=lambda samples: collate(samples, pad),
        loss_fn=token_loss_sum,
        worst_case_sample=lambda: {"input_ids": worst, "labels": worst.clone()},
        item_count=item_count,
        sample_length=sample_length,
        enable_gradient_checkpointing=enable_gradient_checkpointing,
        save=save,
        tokenizer=tokenizer,
        dropped_samples=tokenized.dropped,
        truncated_samples=tokenized.truncated,
    )


def _check_settings(
    max_seq_len: int, dtype: str, max_samples: int | None, lora: LoraSpec | dict | None
) -> LoraSpec | None:
    """The task's settings checked before anything is read; the LoRA settings validated."""
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise CausalLMError(
            f"max_seq_len={max_seq_len!r} must be an integer >= 2 (one input and one target)"
        )
    if dtype not in DTYPES:
        raise CausalLMError(f"dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise CausalLMError(f"max_samples={max_samples!r} must be an integer >= 1 or None")
    try:
        return lora_settings(lora)
    except LoraError as exc:  # the same message, as the task's error (it names the key)
        raise CausalLMError(str(exc)) from None
