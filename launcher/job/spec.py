"""The job spec: what a user asks for, validated once at the edge.

One pydantic model, used by `autobatch run/plan` and by the daemon. Unknown
fields are rejected; every error names the field, the bad value and what is
allowed. Inside the launcher the spec is read-only.
"""

from __future__ import annotations

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

from autobatch.errors import format_validation_error
from autobatch.levers import ShardingChoice
from autobatch.planning.rebalance import DEFAULT_THRESHOLD, DEFAULT_WINDOW
from autobatch.probe.devices import DeviceSpecError, SimulatedDevice, parse_memory
from autobatch.step import storage
from launcher.errors import SpecError
from launcher.job.bounds import MAX_STEPS, check_spec
from launcher.job.tasks import check_builtin_args, check_task_name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, v: Any) -> Any:
        # A NUL byte in a path fails deep inside os calls; in any text it is a mistake.
        for s in [v] if isinstance(v, str) else v if isinstance(v, (list, tuple)) else []:
            if isinstance(s, str) and "\x00" in s:
                raise ValueError("a NUL byte (\\x00) in text: no field allows it")
        return v


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
    # Elastic: the job may run on as few as min_count of its devices. The daemon starts it
    # when that many are free, grows it into devices that free up and shrinks it (never
    # below min_count) for queued jobs; a lost device shrinks it. None: all of them (gang).
    min_count: Annotated[int, Field(ge=1, le=4096)] | None = None

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
        if self.min_count is not None:
            self._check_min_count()
        return self

    def _check_min_count(self) -> None:
        if self.select == "name":
            raise ValueError(
                "min_count needs a known device count: select 'name' picks its GPUs by name "
                "after probing; use select 'count' or 'simulated'"
            )
        n = sum(s.count for s in self.simulated) if self.select == "simulated" else self.count
        if n is not None and self.min_count > n:
            raise ValueError(
                f"min_count={self.min_count} is more than the {n} device(s) selected; "
                f"allowed: 1 to {n}"
            )

    @property
    def elastic(self) -> bool:
        """May run on fewer devices than it selects."""
        return self.min_count is not None

    def simulated_devices(self) -> list[SimulatedDevice]:
        return [d for spec in self.simulated for d in spec.devices()]


class CheckpointSpec(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)

    # default: runs/<job name>/checkpoints; a local path every node shares, or an object
    # store's URI, s3://bucket/prefix or gs://bucket/prefix (docs/storage.md), credentials
    # from the environment only
    dir: str | None = None
    interval: Annotated[int, Field(ge=1)] = 50
    resume: bool = True
    # true: a save copies the state to host memory and a thread writes it while training
    # goes on (the next save, the end or a resize waits for it); false: the loop waits for
    # the write (for debugging). Written `async` in a spec (a Python keyword here).
    background: bool = Field(default=True, alias="async")


class FaultSpec(_Strict):
    """Fault injection for tests and drills: fires once, on the job's first attempt (`slow`:
    from its step on, on every attempt; launcher.job.faults)."""

    # oom: out of memory in a micro-step; crash: kill -9 of the rank's process;
    # crash_in_save: kill -9 of the rank's process in the middle of the checkpoint of the
    # step (its shards written, its checkpoint not yet complete);
    # short_batch: the rank drops a sample of its step (the measured global batch is short);
    # slow: the rank's device runs at `factor` x its speed from the step on (the probe saw
    # it at full speed)
    kind: Literal["oom", "crash", "crash_in_save", "short_batch", "slow"]
    rank: Annotated[int, Field(ge=0)]
    step: Annotated[int, Field(ge=0)]
    micro_step: Literal["first", "last"] = "first"  # oom: a no_sync micro-step, or the synced one
    factor: Annotated[float, Field(gt=0, le=1)] | None = None  # slow only

    @model_validator(mode="after")
    def _factor(self) -> FaultSpec:
        if (self.kind == "slow") != (self.factor is not None):
            raise ValueError(
                f"factor={self.factor!r} with kind {self.kind!r}: kind slow needs factor (its "
                "speed is multiplied by it, 0 < factor <= 1), the other kinds take none"
            )
        return self


# task_args is JSON data within these bounds: nesting depth, values (every visit counts, so
# YAML aliases cannot hide a blow-up) and its size as JSON (approximate).
TASK_ARGS_MAX_DEPTH, TASK_ARGS_MAX_VALUES, TASK_ARGS_MAX_BYTES = 16, 10_000, 64 << 10


def check_task_args(args: dict[str, Any]) -> None:
    """Raise ValueError naming the place when task_args is not bounded JSON data without NULs."""
    stack: list[tuple[Any, str, int]] = [(args, "", 1)]  # value, its path, its depth
    values = size = 0
    while stack:
        value, path, depth = stack.pop()
        where = f" (at {path.lstrip('.')})" if path else ""
        values += 1
        if depth > TASK_ARGS_MAX_DEPTH:
            raise ValueError(f"nested deeper than {TASK_ARGS_MAX_DEPTH} levels{where}")
        if values > TASK_ARGS_MAX_VALUES:
            raise ValueError(f"more than {TASK_ARGS_MAX_VALUES} values")
        if isinstance(value, dict):
            for k, item in value.items():
                if not isinstance(k, str) or "\x00" in k:
                    raise ValueError(f"key {k!r}{where} must be a string without NUL bytes")
                stack.append((item, f"{path}.{k}", depth + 1))
                size += len(k) + 4
        elif isinstance(value, (list, tuple)):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            if "\x00" in value:
                raise ValueError(f"{value!r}{where} holds a NUL byte (\\x00)")
            size += len(value) + 2
        elif isinstance(value, int):  # bool and int; never converted to text here
            size += value.bit_length() // 3 + 2
        elif value is None or isinstance(value, float):
            size += 24
        else:
            raise ValueError(
                f"a {type(value).__name__}{where} is not JSON data (strings, numbers, "
                "booleans, null, lists, mappings)"
            )
        if size > TASK_ARGS_MAX_BYTES:
            raise ValueError(f"over {TASK_ARGS_MAX_BYTES} bytes as JSON")


class JobSpec(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
    task: str = "tiny_gpt"  # a built-in task (launcher.job.tasks) or "package.module:function"
    task_args: dict[str, Any] = {}  # JSON data, bounded (check_task_args)
    global_batch_size: Annotated[int, Field(ge=1, le=1 << 24)]
    max_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = None
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
    # How each rank holds the model (torch FSDP2 for the sharded modes): "none", a full
    # replica (DDP); "optimizer", optimizer state and reduced gradients sharded, ranks may
    # still run different micro-step counts; "full", parameters too (ZeRO-3), every rank
    # runs the same number of micro-steps; "auto", none where a replica fits every device,
    # else the lightest mode that does (the plan's notes say which and why).
    sharding: ShardingChoice = "none"  # the names of autobatch.levers
    devices: DevicesSpec = DevicesSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    # Where rank 0 writes the trained model (e.g. a LoRA adapter) after the last step,
    # for tasks that can save one; default runs/<name>/final.
    output_dir: str | None = None
    seed: int = 0
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = 0  # 0: any free port
    max_restarts: Annotated[int, Field(ge=0, le=100)] = 3
    # The daemon starts higher priorities first (FIFO within one), and shrinks elastic jobs
    # of the same or a lower priority, lowest first, to start the head of the queue.
    priority: Annotated[int, Field(ge=-1000, le=1000)] = 0
    faults: list[FaultSpec] = []
    # DataLoader worker processes per rank that collate its micro-batches ahead of the step
    # (prefetch; pinned memory on GPUs); 0 collates on the training thread. None: min(4, the
    # node's CPUs / its ranks), 0 where a rank would get fewer than 2 CPUs.
    data_workers: Annotated[int, Field(ge=0, le=64)] | None = None
    # Every rank appends the dataset indices of each completed step to
    # <checkpoint dir>/samples-rank<r>.jsonl: an audit that each global batch was exact.
    audit_samples: bool = False
    # Closed-loop balance (docs/rebalancing.md): every rebalance_window steps the ranks share
    # their measured compute and, when a new split of the same global batch predicts a step
    # shorter by more than rebalance_threshold (relative), switch to it together. "auto": on
    # where it applies (planner optimal, two ranks or more); "off": the first plan throughout.
    rebalance: Literal["auto", "off"] = "auto"
    rebalance_window: Annotated[int, Field(ge=2, le=100_000)] = DEFAULT_WINDOW  # steps
    rebalance_threshold: Annotated[float, Field(gt=0, lt=1)] = DEFAULT_THRESHOLD

    @model_validator(mode="after")
    def _length(self) -> JobSpec:
        if self.max_steps is None and self.epochs is None:
            raise ValueError("give max_steps or epochs (or both: whichever ends first)")
        return self

    @model_validator(mode="after")
    def _planner_shards(self) -> JobSpec:
        if self.planner == "equal_split" and self.sharding != "none":
            raise ValueError(
                f"planner equal_split plans replicas only (sharding: none), not sharding "
                f"{self.sharding}: use planner optimal"
            )
        return self

    @model_validator(mode="after")
    def _proportional_limits(self) -> JobSpec:
        if self.sharding != "proportional":
            return self
        if self.precision == "fp16":
            raise ValueError(
                "precision: fp16 is not supported with sharding: proportional (the loss "
                "scaler's inf check would see only this rank's slice of the gradients): use "
                "bf16 or fp32, or sharding: full"
            )
        if self.optimizer.name == "sgd" and self.optimizer.momentum > 0:
            raise ValueError(
                "optimizer.momentum > 0 with optimizer.name: sgd is not supported with "
                "sharding: proportional (its checkpoints gather AdamW's state only): use adamw"
            )
        return self

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        return check_task_name(v)

    @field_validator("task_args")
    @classmethod
    def _bounded_task_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_task_args(v)
        return v

    @model_validator(mode="after")
    def _task_args(self) -> JobSpec:
        check_builtin_args(self)
        return self

    # -- derived values ----------------------------------------------------
    def checkpoint_dir(self, root: str | pathlib.Path = "runs") -> pathlib.Path | str:
        """Where the checkpoints go: a local Path, or an object store's URI (a str;
        autobatch.step.storage)."""
        if self.checkpoint.dir:
            return storage.location(self.checkpoint.dir)
        return pathlib.Path(root) / self.name / "checkpoints"

    def output_path(self, root: str | pathlib.Path = "runs") -> pathlib.Path | str:
        """Where the trained model goes: a local Path, or an object store's URI (a str)."""
        if self.output_dir:
            return storage.location(self.output_dir)
        return pathlib.Path(root) / self.name / "final"

    def total_steps(self, steps_per_epoch: float) -> int:
        """Optimizer steps the job runs: max_steps, epochs, or the smaller of the two."""
        limits = []
        if self.max_steps is not None:
            limits.append(self.max_steps)
        if self.epochs is not None:
            limits.append(max(1, int(self.epochs * steps_per_epoch)))
        return min(limits)


def parse_spec(data: dict[str, Any]) -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(f"a job spec is a mapping of fields, got {type(data).__name__}")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"invalid job spec: {format_validation_error(exc)}") from None
    return check_spec(spec)  # what the spec shows can never run (launcher.job.bounds)


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
