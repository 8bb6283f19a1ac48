"""What a job may ask for: what the spec alone shows can never run, refused before anything
is reserved, and the bounds a plan must keep, checked when it is made.

    spec_problems(spec)    (loc, message) for each thing the spec shows cannot run: a global
                           batch larger than the task's dataset (where the spec shows its
                           size: tiny_gpt's dataset_size), more optimizer steps than
                           MAX_STEPS (epochs over a dataset of known size), one global
                           batch's input larger than the memory of all the job's simulated
                           devices together (where the spec shows a sample's size), a
                           storage URI (checkpoint.dir, output_dir) with credentials in it,
                           or of a scheme no installed file system reaches
    check_spec(spec)       those problems as one SpecError (`autobatch run` and `plan`)
    check_plan(spec, plan) a plan of at most MAX_PLAN_MICRO_BATCHES micro-batches a step
                           (check_plan_size: the plan a job record stores is bounded), whose
                           ranks on simulated devices can hold their share of a step's input
                           (LaunchError, at planning; re-plans check the size)

A global batch larger than the dataset never runs with `epoch_end: drop` (no full batch
fits in an epoch). With `carry` it runs, each batch running through the dataset more
than once; it is refused only where one step's input cannot fit. On a simulated device
the host is the device: the step's micro-batches a rank's loader collates sit in the
memory the device claims, besides what a micro-step uses.

The daemon's admission (launcher.daemon.admission) answers each problem with a 422 naming
its field; the CLI with one line. The spec's own fields are bounded where they are
declared (launcher.job.spec: global_batch_size, max_steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from autobatch.errors import LaunchError
from autobatch.step.storage import uri_problem
from launcher.errors import InvalidSpec
from launcher.job.tasks import TinyGptArgs

if TYPE_CHECKING:
    from autobatch.planning.plan import Plan
    from launcher.job.spec import JobSpec

MAX_STEPS = 10_000_000  # optimizer steps of a job (a checkpoint's name holds 8 digits)
MAX_PLAN_MICRO_BATCHES = 1 << 14  # micro-batches of one step, over all ranks
TINY_GPT_SEQ_LEN = 32  # TinyGPTConfig's default
TOKEN_BYTES = 8  # a collated token id (int64)


@dataclass(frozen=True)
class Problem:
    loc: tuple[str, ...]  # the field, as the API's errors name it
    msg: str


@dataclass(frozen=True)
class DataFacts:
    """What the spec shows of its task's data (None: only the task knows)."""

    samples: int | None = None  # the dataset's size
    sample_bytes: int | None = None  # host memory of one collated sample


def data_facts(spec: JobSpec) -> DataFacts:
    if spec.task != "tiny_gpt":
        return DataFacts()
    args = TinyGptArgs.model_validate(spec.task_args)
    seq_len = args.seq_len or spec.max_seq_len or TINY_GPT_SEQ_LEN
    return DataFacts(args.dataset_size, seq_len * TOKEN_BYTES)


def spec_problems(spec: JobSpec) -> list[Problem]:
    """What in `spec` can never run, each naming its field (empty: nothing the spec shows)."""
    facts, batch = data_facts(spec), spec.global_batch_size
    problems = []
    if facts.samples is not None and batch > facts.samples and spec.epoch_end == "drop":
        problems.append(
            Problem(
                ("global_batch_size",),
                f"global_batch_size={batch} is larger than the dataset ({facts.samples} "
                "samples): with epoch_end drop no full global batch fits in an epoch; lower "
                "it, or use epoch_end carry",
            )
        )
    elif facts.samples is not None and spec.epochs is not None:
        steps = spec.total_steps(_steps_per_epoch(facts.samples, batch, spec.epoch_end))
        if steps > MAX_STEPS:
            problems.append(
                Problem(
                    ("epochs",),
                    f"epochs={spec.epochs:g} of {facts.samples} samples in global batches of "
                    f"{batch} is {steps:,} steps; at most {MAX_STEPS:,} are allowed",
                )
            )
    problems += _input_over_memory(spec, facts)
    problems += _storage_uris(spec)
    return problems


def _storage_uris(spec: JobSpec) -> list[Problem]:
    """A storage URI the job cannot use as given; the message never repeats the value (a
    secret in it must not reach an error, a log or a job record)."""
    fields = ((("checkpoint", "dir"), spec.checkpoint.dir), (("output_dir",), spec.output_dir))
    return [
        Problem(loc, why)
        for loc, value in fields
        if value and (why := uri_problem(value)) is not None
    ]


def check_spec(spec: JobSpec) -> JobSpec:
    """`spec`, or an InvalidSpec (a SpecError) naming each problem of `spec_problems`, with
    one {loc, msg} per problem for the API's 422."""
    problems = spec_problems(spec)
    if problems:
        what = "; ".join(f"{'.'.join(p.loc)}: {p.msg}" for p in problems)
        errors = [{"loc": list(p.loc), "msg": p.msg} for p in problems]
        raise InvalidSpec(f"invalid job spec: {what}", errors)
    return spec


def check_plan(spec: JobSpec, plan: Plan) -> None:
    """A LaunchError saying why when `plan` breaks a bound a job's plan must keep."""
    check_plan_size(plan)
    sample_bytes = data_facts(spec).sample_bytes
    for r in plan.ranks if sample_bytes else ():
        device = plan.capacity(r.rank)
        need = r.samples * sample_bytes
        if device.simulated and device.memory_bytes is not None and need > device.memory_bytes:
            raise LaunchError(
                f"rank {r.rank} ({r.device_name}) would hold {_mib(need)} of input for one step "
                f"({r.samples:,} samples of {sample_bytes} bytes), more than the "
                f"{_mib(device.memory_bytes)} of its simulated device: lower global_batch_size"
            )


def check_plan_size(plan: Plan) -> None:
    """A LaunchError when `plan` has more than MAX_PLAN_MICRO_BATCHES micro-batches a step
    (a re-plan after an out-of-memory, which lowers micro-batches, is checked too)."""
    count = sum(len(r.micro_batches) for r in plan.ranks)
    if count > MAX_PLAN_MICRO_BATCHES:
        raise LaunchError(
            f"the plan has {count:,} micro-batches a step (global batch "
            f"{plan.global_batch_size:,}), more than the {MAX_PLAN_MICRO_BATCHES:,} a job "
            "may run: lower global_batch_size, or use devices that fit larger micro-batches"
        )


def _input_over_memory(spec: JobSpec, facts: DataFacts) -> list[Problem]:
    """One global batch's input, against all the job's simulated devices' memory together:
    however a plan splits the batch, the ranks hold all of it during a step."""
    sims = spec.devices.simulated_devices()
    if facts.sample_bytes is None or not sims:
        return []
    need = spec.global_batch_size * facts.sample_bytes
    have = sum(d.memory_bytes for d in sims)
    if need <= have:
        return []
    msg = (
        f"one global batch of {spec.global_batch_size:,} samples is {_mib(need)} of input "
        f"({facts.sample_bytes} bytes a sample), more than the {_mib(have)} of all the job's "
        "simulated devices together: no plan can hold one step; lower global_batch_size"
    )
    return [Problem(("global_batch_size",), msg)]


def _steps_per_epoch(samples: int, batch: int, epoch_end: str) -> float:
    return samples // batch if epoch_end == "drop" else samples / batch


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
