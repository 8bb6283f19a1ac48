"""The job spec: what a user asks for, validated once at the edge.

One pydantic model, used by `autobatch run/plan` and by the daemon. Unknown
fields are rejected; every error names the field, the bad value and what is
allowed. Inside the launcher the spec is read-only.
"""

from __future__ import annotations

import importlib
import pathlib
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from autobatch.errors import AutobatchError
from autobatch.probe.devices import DeviceSpecError, SimulatedDevice, parse_memory
from autobatch.tasks.task import Task


class SpecError(AutobatchError, ValueError):
    """A job spec is invalid: the message names each bad field and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizerSpec(_Strict):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: Annotated[float, Field(gt=0, le=10)] = 3e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0)] | None = 1.0


class ScheduleSpec(_Strict):
    name: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: Annotated[int, Field(ge=0)] = 0


class SimulatedDeviceSpec(_Strict):
    """A device that does not exist: the CPU limited to `memory` and slowed to `speed`."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]
    memory: str  # "512MiB", "2GB"
    speed: Annotated[float, Field(gt=0, le=1000)] = 1.0
    count: Annotated[int, Field(ge=1, le=64)] = 1

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        try:
            parse_memory(v)
        except DeviceSpecError as exc:
            raise ValueError(str(exc)) from None
        return v

    def devices(self) -> list[SimulatedDevice]:
        return [SimulatedDevice(self.name, parse_memory(self.memory), self.speed)] * self.count


class DevicesSpec(_Strict):
    """Which devices the job uses: every GPU, a count, GPUs whose name matches, or simulated."""

    select: Literal["all", "count", "name", "simulated"] = "all"
    count: Annotated[int, Field(ge=1, le=4096)] | None = None
    name_pattern: str | None = None  # regular expression on the GPU name, e.g. "A100|L4"
    simulated: list[SimulatedDeviceSpec] = []
    # Use every selected device, even one the planner would leave out as too slow.
    keep_all: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> DevicesSpec:
        if self.select == "count" and self.count is None:
            raise ValueError("select='count' needs count: the number of devices to use")
        if self.select == "name":
            if not self.name_pattern:
                raise ValueError("select='name' needs name_pattern, e.g. 'A100|L4'")
            try:
                re.compile(self.name_pattern)
            except re.error as exc:
                raise ValueError(
                    f"name_pattern={self.name_pattern!r} is not a regex: {exc}"
                ) from None
        if self.select == "simulated" and not self.simulated:
            raise ValueError("select='simulated' needs a list of simulated devices")
        if self.simulated and self.select != "simulated":
            raise ValueError(
                f"simulated devices are listed but select={self.select!r}; use select: simulated"
            )
        return self

    def simulated_devices(self) -> list[SimulatedDevice]:
        return [d for spec in self.simulated for d in spec.devices()]


class CheckpointSpec(_Strict):
    dir: str | None = None  # default: runs/<job name>/checkpoints
    interval: Annotated[int, Field(ge=1)] = 50
    resume: bool = True


class FaultSpec(_Strict):
    """Fault injection for tests and drills: fires once, on the job's first attempt."""

    kind: Literal["oom", "crash"]
    rank: Annotated[int, Field(ge=0)]
    step: Annotated[int, Field(ge=0)]
    micro_step: Literal["first", "last"] = "first"  # oom: a no_sync micro-step, or the synced one


class LoraSpec(_Strict):
    r: Annotated[int, Field(ge=1, le=1024)] = 8
    alpha: Annotated[float, Field(gt=0)] = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: list[str] | None = None  # None: peft's default for the architecture


class CausalLMArgs(_Strict):
    """task_args of the built-in `causal_lm` task (needs `pip install 'autobatch[hf]'`)."""

    model_dir: str  # a local Hugging Face model directory (config, weights, tokenizer)
    data: str  # JSONL: {"text": ...} or {"prompt": ..., "completion": ...} per line
    lora: LoraSpec | None = None
    gradient_checkpointing: bool = False
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"
    max_samples: Annotated[int, Field(ge=1)] | None = None


BUILTIN_TASKS = ("tiny_gpt", "causal_lm")


class JobSpec(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
    task: str = "tiny_gpt"  # "tiny_gpt", "causal_lm", or an entrypoint "package.module:function"
    task_args: dict[str, Any] = {}
    global_batch_size: Annotated[int, Field(ge=1, le=1 << 24)]
    max_steps: Annotated[int, Field(ge=1)] | None = None
    epochs: Annotated[float, Field(gt=0)] | None = None
    epoch_end: Literal["drop", "carry"] = "drop"
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    # "auto": bf16 where every device supports it, else fp16 with a loss scaler, fp32
    # without GPUs; the plan states the choice and why.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    max_seq_len: Annotated[int, Field(ge=1)] | None = None
    memory_headroom: Annotated[float, Field(ge=0, lt=1)] = 0.05
    # "optimal": autobatch's plan; "equal_split": every device at the smallest device's
    # micro-batch with the same accumulation (today's DDP recipe), for comparisons.
    planner: Literal["optimal", "equal_split"] = "optimal"
    devices: DevicesSpec = DevicesSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    # Where rank 0 writes the trained model (e.g. a LoRA adapter) after the last step,
    # for tasks that can save one; default runs/<name>/final.
    output_dir: str | None = None
    seed: int = 0
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = 0  # 0: any free port
    max_restarts: Annotated[int, Field(ge=0, le=100)] = 3
    faults: list[FaultSpec] = []
    # Every rank appends the dataset indices of each completed step to
    # <checkpoint dir>/samples-rank<r>.jsonl: an audit that each global batch was exact.
    audit_samples: bool = False

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        if v not in BUILTIN_TASKS and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise ValueError(
                f"task={v!r} must be one of {', '.join(BUILTIN_TASKS)} or an entrypoint "
                "'package.module:function'"
            )
        return v

    @model_validator(mode="after")
    def _length(self) -> JobSpec:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("give max_steps or epochs (or both: whichever ends first)")
        return self

    @model_validator(mode="after")
    def _causal_lm(self) -> JobSpec:
        if self.task != "causal_lm":
            return self
        if self.max_seq_len is None:
            raise ValueError("task 'causal_lm' needs max_seq_len (tokens per sequence, >= 2)")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len={self.max_seq_len} must be >= 2 for causal_lm")
        try:
            CausalLMArgs.model_validate(self.task_args)
        except ValidationError as exc:
            raise ValueError(
                "task_args (causal_lm): " + format_validation_error(exc).replace("; ", ", ")
            ) from None
        return self

    # -- derived values ----------------------------------------------------
    def checkpoint_dir(self, root: str | pathlib.Path = "runs") -> pathlib.Path:
        if self.checkpoint.dir:
            return pathlib.Path(self.checkpoint.dir)
        return pathlib.Path(root) / self.name / "checkpoints"

    def output_path(self, root: str | pathlib.Path = "runs") -> pathlib.Path:
        return pathlib.Path(self.output_dir or pathlib.Path(root) / self.name / "final")

    def total_steps(self, steps_per_epoch: float) -> int:
        """Optimizer steps the job runs: max_steps, epochs, or the smaller of the two."""
        limits = []
        if self.max_steps is not None:
            limits.append(self.max_steps)
        if self.epochs is not None:
            limits.append(max(1, int(self.epochs * steps_per_epoch)))
        return min(limits)


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: 'field.path: message (got value)'."""
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(spec)"
        msg = err["msg"].removeprefix("Value error, ")
        got = "" if err["type"] in ("missing",) else f" (got {err.get('input')!r})"
        if isinstance(err.get("input"), dict):
            got = ""
        lines.append(f"{path}: {msg}{got}")
    return "; ".join(lines)


def parse_spec(data: dict[str, Any]) -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(f"a job spec is a mapping of fields, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"invalid job spec: {format_validation_error(exc)}") from None


def load_spec(path: str | pathlib.Path) -> JobSpec:
    """Read and validate a YAML job spec."""
    p = pathlib.Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read job spec {str(p)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{p}: not valid YAML: {exc}") from None
    return parse_spec(data)


def load_task(spec: JobSpec) -> Task:
    """Build the job's Task: the built-in demo, or the user's entrypoint."""
    if spec.task == "tiny_gpt":
        from autobatch.tasks.tiny_gpt import tiny_gpt_task

        args = dict(spec.task_args)
        if spec.max_seq_len is not None:
            args.setdefault("seq_len", spec.max_seq_len)
        try:
            return tiny_gpt_task(seed=spec.seed, **args)
        except TypeError as exc:
            raise SpecError(f"task_args: {exc}") from None
    if spec.task == "causal_lm":
        from autobatch.tasks.causal_lm import causal_lm_task

        args = CausalLMArgs.model_validate(spec.task_args)
        lora = args.lora.model_dump() if args.lora else None
        return causal_lm_task(
            **{**args.model_dump(), "lora": lora}, max_seq_len=spec.max_seq_len, seed=spec.seed
        )
    module_name, func_name = spec.task.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(
            f"task={spec.task!r}: cannot import module {module_name!r}: {exc}"
        ) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise SpecError(f"task={spec.task!r}: {module_name} has no function {func_name!r}")
    task = func(**spec.task_args)
    if not isinstance(task, Task):
        raise SpecError(f"task={spec.task!r} returned {type(task).__name__}, not an autobatch.Task")
    return task
