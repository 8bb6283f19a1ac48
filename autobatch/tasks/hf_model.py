"""A Hugging Face causal LM from a local directory: the optional imports, checks and loading.

    require_hf        transformers / peft / tokenizers, or an error with the install hint
    check_model_dir   the directory, its config.json and the sequence length it allows
    load_tokenizer    the tokenizer saved beside the model
    load_model        the model in training mode (the job's dtype, LoRA, checkpointing);
                      built unloaded from its config under a `meta` device (estimates)

Nothing is ever downloaded: everything loads from local directories
(``local_files_only=True``). Used by the causal-LM task (`autobatch.tasks.causal_lm`)
and by the estimates that trace its model (`autobatch.probe.lm_depth`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autobatch.errors import CausalLMError
from autobatch.tasks.lora import LoraSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
INSTALL_HINT = "pip install 'autobatch[hf]'"


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


def check_model_dir(model_dir: str, max_seq_len: int) -> Path:
    """`model_dir` as a path once it holds a usable config.json whose model takes
    `max_seq_len` tokens; else a CausalLMError naming what is missing or wrong."""
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


def load_tokenizer(model_path: Path) -> Any:
    """The tokenizer saved in the model's directory."""
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
        model = _with_lora(model, lora)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()  # from_pretrained returns eval mode: no dropout, no checkpointing
    return model


def _with_lora(model: nn.Module, lora: LoraSpec) -> nn.Module:
    peft = require_hf("peft")
    try:
        return peft.get_peft_model(
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


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turns on non-reentrant activation checkpointing (plain, PEFT or DDP-wrapped model)."""
    inner = unwrap(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise CausalLMError(f"{type(inner).__name__} does not support gradient checkpointing")
    # A PeftModel forwards these to the transformers model it wraps. Non-reentrant
    # checkpointing needs no input that requires grad, so frozen embeddings are fine.
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5 (renamed)
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
