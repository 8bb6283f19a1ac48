"""A causal LM from its config.json alone, traced at two shallow depths and scaled to its own.

No weights, tokenizer or data are read: the model is built on `meta` from the
config (`load_model`: the job's dtype, LoRA and checkpointing), copies of the
config with fewer decoder layers (`num_hidden_layers` overridden) are traced on
fake tensors (`trace_step`), and `scale_by_depth` makes the whole model's trace
from theirs: an 8B model in seconds where its own trace takes minutes.

The traced depths are one and two periods of the layers' pattern: 1 and 2 for
identical layers (Llama, Mistral, Qwen2, GPT-2), 2 and 4 where `layer_types`
alternates sliding and full attention (Gemma 2). On 4- to 8-layer models of these
kinds, with and without LoRA, checkpointing and bf16, the scaled trace matched the
full one to float rounding (peak lines, op times, state: tests/test_whatif.py).
What it cannot see: a peak whose moment moves with depth (the max of the step's
moments is convex in depth, so the scaled peak is then below the real one; 1.5 %
on a 6-layer Gemma 2 with checkpointing at 64 tokens and b = 2, where its cast
weights weigh as much as its activations; exact at 128 tokens), and a depth that
is not a whole number of periods (interpolated).

The micro-batches are synthetic: sequences of `seq_len` token ids, the causal-LM
task's worst case (it repeats its longest sample to max_seq_len), one of them a
token shorter and padded when b > 1, as `CausalLMTask.probe_batch` makes them.

transformers and peft are imported lazily (`require_hf`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from autobatch.errors import CausalLMError
from autobatch.probe.measure import MakeOptimizer
from autobatch.probe.trace import StepTrace, scale_by_depth, trace_step
from autobatch.step.precision import Precision
from autobatch.tasks.hf_model import check_model_dir, load_model, require_hf
from autobatch.tasks.lm_data import token_loss_sum
from autobatch.tasks.lora import LoraSpec
from autobatch.tasks.losses import IGNORE_INDEX
from autobatch.tasks.task import Task

SIZES = (2, 16)  # micro-batch sizes traced (b = 1 has no padding: it would bend the line)


@dataclass(frozen=True)
class LMConfig:
    """A causal LM's config.json: what an estimate needs of it."""

    model_dir: str
    config: Any  # a transformers PretrainedConfig
    layers: int
    vocab_size: int

    @property
    def name(self) -> str:
        return f"{self.config.model_type}, {self.layers} layers"

    @property
    def depths(self) -> tuple[int, ...]:
        """The depths traced: one and two periods of the layers' pattern, or the model's
        own depth when it is not deeper than that."""
        kinds = list(getattr(self.config, "layer_types", None) or ["decoder"])
        period = next(
            p
            for p in range(1, len(kinds) + 1)
            if all(k == kinds[i % p] for i, k in enumerate(kinds))
        )
        return (self.layers,) if self.layers <= 2 * period else (period, 2 * period)


def load_lm_config(model_dir: str, max_seq_len: int) -> LMConfig:
    """The config of `model_dir`, or a CausalLMError naming what is missing or wrong."""
    transformers = require_hf("transformers")
    _check_model_type(model_dir, transformers)
    path = check_model_dir(model_dir, max_seq_len)  # the directory, config.json, its length
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise CausalLMError(
            f"model_dir={model_dir!r}: config.json describes a {config.model_type!r} model "
            f"({type(config).__name__}), which AutoModelForCausalLM cannot build; give a "
            "causal LM's config (model_type llama, mistral, qwen2, gpt2, ...)"
        )
    layers = getattr(config, "num_hidden_layers", None)
    vocab = getattr(config, "vocab_size", None)
    for key, value in (("num_hidden_layers", layers), ("vocab_size", vocab)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CausalLMError(
                f"model_dir={model_dir!r}: config.json has {key}={value!r}; an estimate "
                "from the config needs an integer >= 1"
            )
    return LMConfig(str(path), config, layers, vocab)


def _check_model_type(model_dir: str, transformers: Any) -> None:
    """A one-line CausalLMError when config.json is not JSON or names no model_type this
    transformers knows (transformers' own message is a page long)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return  # `check_model_dir` says so
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CausalLMError(f"model_dir={model_dir!r}: config.json is not JSON ({exc})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type in transformers.CONFIG_MAPPING:
        return
    auto = require_hf("transformers.models.auto.modeling_auto")
    names = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    known = [n for n in ("llama", "mistral", "qwen2", "gemma2", "gpt2") if n in names]
    what = "no model_type" if model_type is None else f"model_type={model_type!r}"
    raise CausalLMError(
        f"model_dir={model_dir!r}: config.json has {what}, which transformers "
        f"{transformers.__version__} does not know; causal LMs it knows: {', '.join(known)}, "
        f"... ({len(names)} in all)"
    )


@contextlib.contextmanager
def shallow_copies(lm: LMConfig) -> Iterator[dict[int, Path]]:
    """Directories holding the model's config.json at each of its `depths` (per-layer
    lists such as `layer_types` cut to it), for `load_model`; removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="autobatch-depth-") as tmp:
        dirs = {}
        for n in lm.depths:
            config = copy.deepcopy(lm.config)
            config.num_hidden_layers = n
            if isinstance(getattr(config, "layer_types", None), list):
                config.layer_types = config.layer_types[:n]
            dirs[n] = Path(tmp) / f"layers-{n}"
            config.save_pretrained(dirs[n])
        yield dirs


@dataclass(frozen=True)
class SyntheticLMTask(Task):
    """A causal-LM task for shapes only: micro-batches of `seq_len` synthetic token ids."""

    seq_len: int = 2
    vocab_size: int = 2

    def probe_batch(self, size: int) -> dict[str, torch.Tensor]:
        ids = (torch.arange(self.seq_len) % self.vocab_size).expand(size, -1).clone()
        labels, mask = ids.clone(), torch.ones_like(ids)
        if size > 1:  # one sequence a token shorter, padded: the attention-mask path
            labels[-1, -1], mask[-1, -1] = IGNORE_INDEX, 0
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def synthetic_task(
    model_dir: str | Path,
    *,
    seq_len: int,
    vocab_size: int,
    dtype: str = "float32",
    lora: LoraSpec | None = None,
    gradient_checkpointing: bool = False,
) -> SyntheticLMTask:
    """The causal-LM task's model (`load_model`) on synthetic micro-batches."""

    def build_model() -> torch.nn.Module:
        return load_model(
            model_dir, dtype=dtype, lora=lora, gradient_checkpointing=gradient_checkpointing
        )

    return SyntheticLMTask(
        build_model=build_model,
        dataset=(),
        collate=lambda samples: samples,  # never called: probe_batch makes the batches
        loss_fn=token_loss_sum,
        seq_len=seq_len,
        vocab_size=vocab_size,
    )


def trace_lm(
    lm: LMConfig,
    dirs: dict[int, Path],
    *,
    seq_len: int,
    make_optimizer: MakeOptimizer,
    precision: Precision,
    dtype: str = "float32",
    lora: LoraSpec | None = None,
    gradient_checkpointing: bool = False,
) -> StepTrace:
    """The whole model's training step, from its shallow copies (`shallow_copies`)."""
    traces = []
    for n in lm.depths:
        task = synthetic_task(
            dirs[n],
            seq_len=seq_len,
            vocab_size=lm.vocab_size,
            dtype=dtype,
            lora=lora,
            gradient_checkpointing=gradient_checkpointing,
        )
        with warnings.catch_warnings():  # transformers' deprecation notes, per model built
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
            traces.append(
                trace_step(task, make_optimizer=make_optimizer, precision=precision, sizes=SIZES)
            )
    if len(traces) == 1:
        return traces[0]
    return scale_by_depth(*traces, depths=lm.depths, layers=lm.layers)


def with_half_precision(trace: StepTrace, dtype: torch.dtype) -> StepTrace:
    """A bf16 trace as fp16's (or back): the same ops on tensors of the same sizes; only the
    FLOP/s peak of the half-precision ones differs."""
    half = (torch.bfloat16, torch.float16)

    def relabel(ops: Sequence) -> tuple:
        return tuple(replace(op, dtype=dtype) if op.dtype in half else op for op in ops)

    return replace(
        trace,
        micro_ops=(relabel(trace.micro_ops[0]), relabel(trace.micro_ops[1])),
        optimizer_ops=relabel(trace.optimizer_ops),
    )
