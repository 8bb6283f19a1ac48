"""The task registry: what a job's `task` names, how its arguments are checked, who may run it.

    name -> TaskEntry(args model, factory, daemon default)

A built-in task's `task_args` are validated with its args model when the spec is
(so a bad argument is an error at submit time, naming the field); its factory
builds the `Task` on every worker. Any other `task` is an entrypoint
"package.module:function" returning a `Task`; the daemon runs those only from
modules its operator allows (`--task-module`), since they run arbitrary code.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autobatch.errors import format_validation_error
from autobatch.tasks.lora import LoraSpec
from autobatch.tasks.task import Task
from launcher.errors import TaskError

ENTRYPOINT = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class TaskRequest(Protocol):
    """What of a job spec names its task (a JobSpec is one)."""

    @property
    def task(self) -> str: ...
    @property
    def task_args(self) -> dict[str, Any]: ...
    @property
    def max_seq_len(self) -> int | None: ...
    @property
    def seed(self) -> int: ...


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TinyGptArgs(_Args):
    """task_args of the built-in demo `tiny_gpt` (the tiny GPT on a synthetic corpus)."""

    dataset_size: Annotated[int, Field(ge=1, le=1 << 24)] = 4096
    vocab_size: Annotated[int, Field(ge=2, le=1 << 20)] | None = None
    seq_len: Annotated[int, Field(ge=2, le=1 << 16)] | None = None
    d_model: Annotated[int, Field(ge=1, le=1 << 16)] | None = None
    n_heads: Annotated[int, Field(ge=1, le=1024)] | None = None
    n_layers: Annotated[int, Field(ge=1, le=1024)] | None = None


class CausalLMArgs(_Args):
    """task_args of the built-in `causal_lm` task (needs `pip install 'autobatch[hf]'`)."""

    model_dir: str  # a local Hugging Face model directory (config, weights, tokenizer)
    data: str  # JSONL: {"text": ...} or {"prompt": ..., "completion": ...} per line
    lora: LoraSpec | None = None
    gradient_checkpointing: bool = False
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"
    max_samples: Annotated[int, Field(ge=1)] | None = None


def _tiny_gpt(args: TinyGptArgs, spec: TaskRequest) -> Task:
    from autobatch.tasks.tiny_gpt import tiny_gpt_task

    sizes = args.model_dump(exclude_none=True)
    if spec.max_seq_len is not None:
        sizes.setdefault("seq_len", spec.max_seq_len)
    return tiny_gpt_task(seed=spec.seed, **sizes)


def _causal_lm(args: CausalLMArgs, spec: TaskRequest) -> Task:
    from autobatch.tasks.causal_lm import causal_lm_task

    fields = {name: getattr(args, name) for name in CausalLMArgs.model_fields}
    return causal_lm_task(**fields, max_seq_len=spec.max_seq_len, seed=spec.seed)


@dataclass(frozen=True)
class TaskEntry:
    args: type[BaseModel]  # validates task_args
    build: Callable[[BaseModel, TaskRequest], Task]
    daemon_default: bool  # the daemon runs it without being told to (--task-module)
    min_seq_len: int | None = None  # needs max_seq_len of at least this
    path_args: tuple[str, ...] = ()  # task_args it reads files from (the daemon confines them)


BUILTIN: dict[str, TaskEntry] = {
    "tiny_gpt": TaskEntry(TinyGptArgs, _tiny_gpt, daemon_default=True),
    "causal_lm": TaskEntry(
        CausalLMArgs,
        _causal_lm,
        daemon_default=True,
        min_seq_len=2,
        path_args=("model_dir", "data"),
    ),
}


def check_task_name(task: str) -> str:
    """`task` if it names a built-in task or an entrypoint, else a ValueError saying which."""
    if task not in BUILTIN and not ENTRYPOINT.fullmatch(task):
        raise ValueError(
            f"task={task!r} must be one of {', '.join(BUILTIN)} or an entrypoint "
            "'package.module:function'"
        )
    return task


def check_builtin_args(spec: TaskRequest) -> None:
    """A ValueError (for the spec's validator) when a built-in task's arguments are invalid."""
    entry = BUILTIN.get(spec.task)
    if entry is None:
        return  # an entrypoint's arguments are its own business, checked when it builds
    if entry.min_seq_len is not None:
        if spec.max_seq_len is None:
            raise ValueError(
                f"task {spec.task!r} needs max_seq_len (tokens per sequence, >= "
                f"{entry.min_seq_len})"
            )
        if spec.max_seq_len < entry.min_seq_len:
            raise ValueError(
                f"max_seq_len={spec.max_seq_len} must be >= {entry.min_seq_len} for {spec.task}"
            )
    try:
        entry.args.model_validate(spec.task_args)
    except ValidationError as exc:
        problems = format_validation_error(exc).replace("; ", ", ")
        raise ValueError(f"task_args ({spec.task}): {problems}") from None


def daemon_refuses(task: str, allowed_modules: tuple[str, ...]) -> str | None:
    """Why the daemon will not run `task` (None: it will)."""
    entry = BUILTIN.get(task)
    if entry is not None:
        return None if entry.daemon_default else f"task={task!r} is not enabled on this daemon"
    module = task.split(":")[0]
    if any(module == m or module.startswith(m + ".") for m in allowed_modules if m):
        return None
    allowed = ", ".join(allowed_modules) or "none (start the daemon with --task-module)"
    return f"task={task!r} is not in a module this daemon allows ({allowed})"


def load_task(spec: TaskRequest) -> Task:
    """Build the job's Task: a built-in one, or the user's entrypoint."""
    entry = BUILTIN.get(spec.task)
    if entry is not None:
        return entry.build(entry.args.model_validate(spec.task_args), spec)
    module_name, func_name = spec.task.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(
            f"task={spec.task!r}: cannot import module {module_name!r}: {exc}"
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise TaskError(f"task={spec.task!r}: {module_name} has no function {func_name!r}")
    task = func(**spec.task_args)
    if not isinstance(task, Task):
        raise TaskError(f"task={spec.task!r} returned {type(task).__name__}, not an autobatch.Task")
    return task
