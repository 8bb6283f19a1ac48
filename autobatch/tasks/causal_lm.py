"""The built-in Hugging Face causal-LM task: a local model directory and a JSONL file.

    task: causal_lm
    max_seq_len: 512
    task_args: {model_dir: ./model, data: ./data.jsonl, lora: {r: 8}}

Each JSONL line is ``{"text": ...}`` (every token is a target) or ``{"prompt": ...,
"completion": ...}`` (only the completion's tokens are targets). The data is tokenized
once, when the task is built. A micro-batch's loss is the SUM of its target tokens'
cross-entropies, so the accumulator's weighting by the global batch's target-token
count gives the full-batch token-mean gradient (DESIGN.md, invariant 3) however
unevenly lengths and padding fall on ranks and micro-batches.

transformers, tokenizers and peft are optional (``pip install 'autobatch[hf]'``) and
imported only inside the functions that need them. Nothing is ever downloaded: models
and tokenizers load from local directories (``local_files_only=True``).

A tiny random model and example data to try it on: `autobatch.tasks.lm_example`.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autobatch.errors import AutobatchError
from autobatch.tasks.lora import LoraError, LoraSpec, lora_settings
from autobatch.tasks.losses import IGNORE_INDEX, next_token_loss_sum
from autobatch.tasks.task import Task

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
INSTALL_HINT = "pip install 'autobatch[hf]'"

Sample = dict[str, torch.Tensor]
log = logging.getLogger(__name__)


class CausalLMError(AutobatchError, ValueError):
    """The causal-LM task's model directory, data file or settings are unusable."""


def require_hf(module: str) -> Any:
    """The optional dependency `module`, or an error that says how to install it."""
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        raise CausalLMError(
            f"the causal-LM task needs {module!r}, which could not be imported ({exc}); "
            f"install it with: {INSTALL_HINT}"
        ) from exc
    if module == "transformers":
        imported.utils.logging.disable_progress_bar()  # a bar per rank per load/save is noise
    return imported


# ---------------------------------------------------------------------------
# the task


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
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise CausalLMError(
            f"max_seq_len={max_seq_len!r} must be an integer >= 2 (one input and one target)"
        )
    if dtype not in DTYPES:
        raise CausalLMError(f"dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise CausalLMError(f"max_samples={max_samples!r} must be an integer >= 1 or None")
    try:
        lora_config = lora_settings(lora)
    except LoraError as exc:
        raise CausalLMError(str(exc)) from None
    model_path = _check_model_dir(model_dir, max_seq_len)
    tokenizer = _load_tokenizer(model_path)
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
    pad_id = _pad_id(tokenizer)
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
        _unwrap(model).save_pretrained(out_dir)  # a PEFT model writes only its adapter
        tokenizer.save_pretrained(out_dir)

    return CausalLMTask(
        build_model=build_model,
        dataset=tokenized.samples,
        collate=lambda samples: collate(samples, pad_id),
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


def read_jsonl(path: str | Path, *, max_samples: int | None = None) -> list[Record]:
    """The records of a JSONL file, checked line by line (blank lines are skipped)."""
    p = Path(path)
    if not p.is_file():
        raise CausalLMError(f"data={str(path)!r}: no such file")
    allowed = 'expected {"text": ...} or {"prompt": ..., "completion": ...}'
    records: list[Record] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if max_samples is not None and len(records) >= max_samples:
                break
            if not line.strip():
                continue
            where = f"{p.name}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CausalLMError(f"{where}: not valid JSON ({exc.msg}); {allowed}") from None
            if not isinstance(obj, dict):
                raise CausalLMError(f"{where}: {allowed}, got a JSON {type(obj).__name__}")
            keys = sorted(obj)
            if keys not in (["text"], ["completion", "prompt"]):
                raise CausalLMError(f"{where}: {allowed}, got keys {keys}")
            for key in keys:
                if not isinstance(obj[key], str):
                    raise CausalLMError(
                        f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}"
                    )
            records.append(Record(obj.get("prompt"), obj.get("text", obj.get("completion"))))
    if not records:
        raise CausalLMError(f"data={str(path)!r}: the file has no samples; {allowed}, one a line")
    return records


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


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def _bos_prefix(tokenizer: Any) -> list[int]:
    """[BOS] if the tokenizer puts one in front of a text by itself, else []."""
    bos = tokenizer.bos_token_id
    specials = tokenizer("", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and specials[:1] == [bos] else []


def _pad_id(tokenizer: Any) -> int:
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    return 0


# ---------------------------------------------------------------------------
# the model


def _check_model_dir(model_dir: str, max_seq_len: int) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise CausalLMError(f"model_dir={model_dir!r}: no such directory")
    if not (path / "config.json").is_file():
        raise CausalLMError(
            f"model_dir={model_dir!r} has no config.json: give a directory written by "
            "save_pretrained (a model's files, not a hub id: nothing is downloaded)"
        )
    transformers = require_hf("transformers")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CausalLMError(f"model_dir={model_dir!r}: config.json is unusable: {exc}") from exc
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_seq_len > limit:
        raise CausalLMError(
            f"max_seq_len={max_seq_len} exceeds the model's max_position_embeddings={limit} "
            f"(model_dir={model_dir!r})"
        )
    return path


def _load_tokenizer(model_path: Path) -> Any:
    transformers = require_hf("transformers")
    try:
        return transformers.AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CausalLMError(
            f"model_dir={str(model_path)!r}: no usable tokenizer there ({exc}); save the "
            "tokenizer into the model directory with tokenizer.save_pretrained(model_dir)"
        ) from exc


def load_model(
    model_dir: str | Path,
    *,
    dtype: str = "float32",
    lora: LoraSpec | None = None,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """The model of `model_dir` in training mode, without a KV cache, LoRA-wrapped if asked."""
    transformers = require_hf("transformers")
    auto = transformers.AutoModelForCausalLM
    # transformers 4.56 renamed torch_dtype to dtype; an older one would silently take
    # dtype= as a config field and load float32.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    as_dtype = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": DTYPES[dtype]}
    if torch.get_default_device().type == "meta":
        # Shapes only (memory estimate, profile cache key): from_pretrained refuses a meta
        # device context, so build the same architecture from its config, unloaded.
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        model = auto.from_config(config, **as_dtype)
    else:
        model = auto.from_pretrained(model_dir, local_files_only=True, **as_dtype)
    model.config.use_cache = False  # a cache only costs memory in training
    if lora is not None:
        peft = require_hf("peft")
        try:
            model = peft.get_peft_model(
                model,
                peft.LoraConfig(
                    task_type=peft.TaskType.CAUSAL_LM,
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=lora.target_modules,
                    # GPT-2's projections are Conv1D (weights stored transposed)
                    fan_in_fan_out=model.config.model_type == "gpt2",
                ),
            )
        except ValueError as exc:
            raise CausalLMError(f"lora: {exc}") from exc
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()  # from_pretrained returns eval mode: no dropout, no checkpointing
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turns on non-reentrant activation checkpointing (plain, PEFT or DDP-wrapped model)."""
    inner = _unwrap(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise CausalLMError(f"{type(inner).__name__} does not support gradient checkpointing")
    # A PeftModel forwards these to the transformers model it wraps. Non-reentrant
    # checkpointing needs no input that requires grad, so frozen embeddings are fine.
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5 (renamed)
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
