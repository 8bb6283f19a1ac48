"""Heterogeneous DDP on one NVIDIA GPU: ranks with different memory caps, probed, planned, trained.

    .venv/bin/python benchmarks/gpu_check.py [--caps-gib 4 2.5 1.5] [--steps 30] [--no-write]

Three processes (one per entry of --caps-gib) share GPU 0. NCCL refuses two
ranks on one GPU, so they form a gloo process group, which all-reduces CUDA
tensors. Each caps its allocator with torch.cuda.set_per_process_memory_fraction,
so each has a different largest micro-batch. Then, with a small GPT in bf16
(fp16 where the GPU has no bf16) and AdamW(foreach=True):

1. probe: each rank in turn runs `profile_model` (at most 4 measured steps), the
   others wait, so timings are not disturbed;
2. plan: the capacities are all-gathered, every rank computes the same
   `make_plan` (and `equal_split_plan`, today's DDP recipe);
3. train `--steps` optimizer steps with the plan, then as many with the equal
   split, from the same initial weights, with the library's Accumulator under
   DDP (sync_loss=False and the default agree_on_oom=False, so the gradient
   all-reduce is the only collective of a step; the launcher's worker adds two,
   see bench_hetero). A DDP communication hook counts gradient all-reduces, and
   `dist.all_reduce` is wrapped to count any other all-reduce. An out-of-memory
   ends the check with an error naming the rank and step.

It reports per rank: the cap, the planned micro-batches (size and accumulation),
the peak predicted by the probe for that micro-batch (plus DDP's gradient
buckets, which the single-process probe does not hold) against the allocator's
measured peak, and OOMs; the gradient of the first step (after DDP's all-reduce,
before the optimizer) against a single-process full-batch reference computed
afterwards in this process without a cap, as a relative L2 error (next to the
error of the bf16 reference itself against fp32, the precision's own noise), and
the same in fp32 with a plan at a third of each limit (fp32 activations are larger)
against the fp32 reference (exact up to rounding);
synced backwards and all-reduces per step; samples/s of the plan and of the
equal split (steps after the first `WARMUP`, wall time on rank 0).

All ranks share one GPU's compute: each rank's time model is measured alone,
but in training the three processes' kernels interleave, so the planner's
predicted step time is optimistic; the plan and the equal split share the GPU
alike, so their ratio compares like with like.

The results are printed and, unless --no-write, written into the GPU section of
benchmarks/RESULTS.md (between the gpu-check markers, which make_results.py
keeps). `--cpu` runs the same code on the CPU with simulated devices of
--caps-mib, as a functional check on a machine without a GPU (it writes nothing).
Meant to finish well under 5 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import math
import pathlib
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from autobatch.planning.plan import Plan
from autobatch.planning.planner import equal_split_plan, make_plan
from autobatch.planning.sampler import GlobalBatchSampler
from autobatch.probe.devices import DeviceInfo, SimulatedDevice
from autobatch.probe.measure import to_device
from autobatch.probe.profile import ModelProfile, profile_model
from autobatch.probe.simulated import TensorMemory
from autobatch.step.accumulate import Accumulator
from autobatch.tasks.task import Task
from autobatch.tasks.tiny_gpt import tiny_gpt_task

GPU_MODEL = {"vocab_size": 8192, "seq_len": 512, "d_model": 512, "n_heads": 8, "n_layers": 6}
CPU_MODEL = {"seq_len": 64}  # the demo's tiny GPT, for --cpu
GLOBAL_BATCH = 64
WARMUP = 5  # steps not timed
SEED = 0
RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"


@dataclass(frozen=True)
class Settings:
    caps_bytes: tuple[int, ...]  # one rank per cap
    steps: int
    cpu: bool
    precision: str
    port: int
    out_dir: str

    @property
    def world(self) -> int:
        return len(self.caps_bytes)

    def task(self) -> Task:
        return _task(self.cpu)


@functools.cache
def _task(cpu: bool) -> Task:
    return tiny_gpt_task(dataset_size=2048, seed=SEED, **(CPU_MODEL if cpu else GPU_MODEL))


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-4, foreach=True)


# ---------------------------------------------------------------------------
# counting collectives


class Collectives:
    """Counts DDP's gradient-bucket all-reduces (a comm hook) and every other all-reduce."""

    def __init__(self) -> None:
        self.bucket_calls = 0  # one per gradient bucket
        self.synced_backwards = 0  # the last bucket of a backward: one per synced backward
        self.all_reduce_calls = 0  # every dist.all_reduce, the hook's included
        self._original = dist.all_reduce

        def counting_all_reduce(*args: Any, **kwargs: Any) -> Any:
            self.all_reduce_calls += 1
            return self._original(*args, **kwargs)

        dist.all_reduce = counting_all_reduce

    def hook(self, state, bucket):  # noqa: ANN001, ANN201  (DDP checks real annotations)
        self.bucket_calls += 1
        self.synced_backwards += int(bucket.is_last())
        return default_hooks.allreduce_hook(state, bucket)

    def counts(self) -> tuple[int, int, int]:
        return self.synced_backwards, self.bucket_calls, self.all_reduce_calls - self.bucket_calls

    def close(self) -> None:
        dist.all_reduce = self._original


class GradSnapshot(torch.optim.Optimizer):
    """An optimizer whose step copies the (synced, unscaled) gradients and changes nothing."""

    def __init__(self, model: torch.nn.Module) -> None:
        named = list(model.named_parameters())
        super().__init__([p for _, p in named], {})
        self.names = [n for n, _ in named]
        self.grads: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        params = self.param_groups[0]["params"]
        self.grads = {n: p.grad.detach().float().cpu() for n, p in zip(self.names, params)}


# ---------------------------------------------------------------------------
# one rank


def device_info(settings: Settings, rank: int) -> tuple[DeviceInfo, torch.device]:
    """This rank's device: GPU 0 capped to its fraction, or a simulated CPU device."""
    cap = settings.caps_bytes[rank]
    if settings.cpu:
        return SimulatedDevice(f"cpu-cap{rank}", cap).info(rank), torch.device("cpu")
    device = torch.device("cuda:0")
    torch.cuda.set_device(device)
    free, total = torch.cuda.mem_get_info(device)
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    props = torch.cuda.get_device_properties(device)
    info = DeviceInfo(
        index=0,
        uuid=str(getattr(props, "uuid", "GPU-0")),
        name=props.name,
        total_bytes=total,
        free_bytes=free,
        used_bytes=total - free,
        compute_capability=(props.major, props.minor),
        bf16_supported=torch.cuda.is_bf16_supported(),
        pci_bus_id=None,
        torch_device="cuda:0",
    )
    return info, device


def probe_in_turn(settings: Settings, rank: int, info: DeviceInfo) -> ModelProfile:
    profile = None
    for turn in range(settings.world):
        if turn == rank:
            torch.manual_seed(SEED)
            profile = profile_model(
                settings.task(),
                info,
                make_optimizer=adamw,
                precision=settings.precision,
                distributed=True,
            )
        dist.barrier()
    assert profile is not None
    return profile


@dataclass
class RunStats:
    """One training run of one rank."""

    samples_per_s: float
    peak_bytes: int
    reserved_bytes: int | None
    syncs_per_step: tuple[int, ...]
    buckets_per_step: tuple[int, ...]
    other_all_reduces_per_step: tuple[int, ...]
    first_loss: float
    last_loss: float


class _Peak:
    """The allocator's peak on CUDA; counted tensor bytes on the CPU."""

    def __init__(self, device: torch.device, model: torch.nn.Module, opt: Any) -> None:
        self.device = device
        self.memory = None if device.type == "cuda" else TensorMemory(model=model, optimizer=opt)
        self.peak = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def __enter__(self) -> None:
        if self.memory is not None:
            self.memory.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.memory is not None:
            self.peak = max(self.peak, self.memory.peak_bytes)
            self.memory.__exit__(*exc)

    def result(self) -> tuple[int, int | None]:
        if self.memory is not None:
            return self.peak, None
        d = self.device
        return torch.cuda.max_memory_allocated(d), torch.cuda.max_memory_reserved(d)


def train(settings: Settings, rank: int, device: torch.device, plan: Plan) -> RunStats:
    """`settings.steps` steps of `plan` from the seeded initial weights."""
    task = settings.task()
    torch.manual_seed(SEED)
    model = task.build_model().to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    counter = Collectives()
    ddp.register_comm_hook(None, counter.hook)
    opt = adamw(model)
    acc = Accumulator(ddp, opt, precision=settings.precision)
    sampler = GlobalBatchSampler(len(task.dataset), plan.global_batch_size, seed=SEED)
    peak = _Peak(device, model, opt)
    syncs, buckets, others, losses = [], [], [], []
    t0 = 0.0
    for step in range(settings.steps):
        if step == WARMUP:
            _sync(device)
            t0 = time.perf_counter()
        batches = [to_device(task.batch(i), device) for i in sampler.micro_batches(plan, rank)]
        n_items = task.count_items(sampler.global_batch())
        before = counter.counts()
        with peak, _no_oom(f"rank {rank}, step {step}, {plan.ranks[rank].micro_batches}"):
            result = acc.step(batches, task.loss_fn, global_items=n_items, sync_loss=False)
        _append_counts(before, counter.counts(), syncs, buckets, others)
        losses.append(result.loss)
        sampler.advance()
    _sync(device)
    seconds = time.perf_counter() - t0
    loss = torch.tensor([losses[0], losses[-1]], dtype=torch.float64)
    counter.close()
    dist.all_reduce(loss)  # after the counted steps: each rank held its part of the loss
    peak_bytes, reserved = peak.result()
    del ddp, model, opt, acc
    _free(device)
    return RunStats(
        samples_per_s=plan.global_batch_size * (settings.steps - WARMUP) / seconds,
        peak_bytes=peak_bytes,
        reserved_bytes=reserved,
        syncs_per_step=tuple(syncs),
        buckets_per_step=tuple(buckets),
        other_all_reduces_per_step=tuple(others),
        first_loss=float(loss[0]),
        last_loss=float(loss[1]),
    )


@contextlib.contextmanager
def _no_oom(where: str) -> Iterator[None]:
    """An out-of-memory ends the check: the other ranks would wait in the all-reduce."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise SystemExit(f"OUT OF MEMORY ({where}): {str(exc).splitlines()[0]}") from None


def _append_counts(
    before: tuple[int, int, int], after: tuple[int, int, int], *lists: list[int]
) -> None:
    for out, b, a in zip(lists, before, after):
        out.append(a - b)


def first_step_grads(
    settings: Settings, rank: int, device: torch.device, plan: Plan, precision: str
) -> dict[str, torch.Tensor]:
    """The gradients the Accumulator hands the optimizer in the plan's first step."""
    task = settings.task()
    torch.manual_seed(SEED)
    model = task.build_model().to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    snapshot = GradSnapshot(model)
    scaler = None  # fp16: a scale of 1, so the first step is not skipped for overflow
    if precision == "fp16":
        scaler = torch.amp.GradScaler(device.type, init_scale=1.0)
    acc = Accumulator(ddp, snapshot, precision=precision, scaler=scaler)
    sampler = GlobalBatchSampler(len(task.dataset), plan.global_batch_size, seed=SEED)
    batches = [to_device(task.batch(i), device) for i in sampler.micro_batches(plan, rank)]
    acc.step(batches, task.loss_fn, global_items=task.count_items(sampler.global_batch()))
    del ddp, model, acc
    _free(device)
    return snapshot.grads


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rank_main(rank: int, settings: Settings) -> None:
    torch.set_num_threads(1)
    info, device = device_info(settings, rank)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{settings.port}",
        rank=rank,
        world_size=settings.world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        profile = probe_in_turn(settings, rank, info)
        capacities: list[Any] = [None] * settings.world
        dist.all_gather_object(capacities, profile.capacity(f"rank{rank}", info.name))
        plan = make_plan(GLOBAL_BATCH, capacities)
        if plan.world_size < settings.world:  # a rank left out: this check trains on all
            plan = make_plan(GLOBAL_BATCH, capacities, keep_all=True)
        equal = equal_split_plan(GLOBAL_BATCH, capacities)
        grads = first_step_grads(settings, rank, device, plan, settings.precision)
        # fp32 activations take about twice the memory: a plan at a third of each limit
        smaller = [replace(c, max_micro_batch=max(1, c.max_micro_batch // 3)) for c in capacities]
        plan32 = make_plan(GLOBAL_BATCH, smaller, keep_all=True)
        grads32 = first_step_grads(settings, rank, device, plan32, "fp32")
        if rank == 0:
            torch.save({"grads": grads, "grads32": grads32}, f"{settings.out_dir}/grads.pt")
        runs = {"plan": train(settings, rank, device, plan)}
        runs["equal split"] = train(settings, rank, device, equal)
        report = {
            "rank": rank,
            "cap_bytes": settings.caps_bytes[rank],
            "profile": _profile_summary(profile, plan.ranks[rank].micro_batch_size),
            "plan_json": plan.to_json(indent=None),
            "plan32_micro_batches": [list(r.micro_batches) for r in plan32.ranks],
            "equal_json": equal.to_json(indent=None),
            "runs": {k: asdict(v) for k, v in runs.items()},
        }
        pathlib.Path(f"{settings.out_dir}/rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def _profile_summary(p: ModelProfile, b: int) -> dict:
    ddp = dict(p.reserve).get("ddp_gradient_buckets", 0)
    return {
        "device": p.device_name,
        "precision": p.precision,
        "budget_bytes": p.budget_bytes,
        "max_micro_batch": p.max_micro_batch,
        "measured_steps": p.measured_steps,
        "predicted_peak_bytes": p.peak_bytes(b),
        "ddp_bucket_bytes": ddp,
        "fixed_s": p.fixed_s,
        "per_sample_s": p.per_sample_s,
    }


# ---------------------------------------------------------------------------
# the reference and the report (parent process)


def reference_grads(settings: Settings, precision: str) -> tuple[dict[str, torch.Tensor], int]:
    """Single process, the whole first global batch in one forward and backward (in chunks
    only if that does not fit the GPU); returns the gradients and the chunk size."""
    device = torch.device("cpu" if settings.cpu else "cuda:0")
    for chunk in (GLOBAL_BATCH, 16, 4):
        grads = None
        with contextlib.suppress(torch.OutOfMemoryError):  # retry smaller, outside the handler
            grads = _reference(settings, precision, device, chunk)
        _free(device)
        if grads is not None:
            return grads, chunk
    raise SystemExit("the single-process reference does not fit the GPU even in chunks of 4")


def _reference(
    settings: Settings, precision: str, device: torch.device, chunk: int
) -> dict[str, torch.Tensor]:
    task = settings.task()
    torch.manual_seed(SEED)
    model = task.build_model().to(device)
    indices = GlobalBatchSampler(len(task.dataset), GLOBAL_BATCH, seed=SEED).global_batch()
    n_items = task.count_items(indices)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    for start in range(0, len(indices), chunk):
        batch = to_device(task.batch(indices[start : start + chunk]), device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = task.loss_fn(model, batch)
        (loss.float() / n_items).backward()
        del loss, batch
    return {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()}


def rel_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diff = math.sqrt(sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b))
    norm = math.sqrt(sum(float(b[k].double().pow(2).sum()) for k in b))
    return diff / norm


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def _set(values: tuple[int, ...]) -> str:
    return ",".join(map(str, sorted(set(values))))


def report_lines(settings: Settings, reports: list[dict], errors: dict[str, float]) -> list[str]:
    name = "CPU (functional check, --cpu)" if settings.cpu else torch.cuda.get_device_name(0)
    plan = Plan.from_json(reports[0]["plan_json"])
    equal = Plan.from_json(reports[0]["equal_json"])
    lines = [
        f"GPU: {name}; torch {torch.__version__}; {settings.world} ranks on it (gloo); "
        f"{settings.precision}; model {CPU_MODEL if settings.cpu else GPU_MODEL}; "
        f"global batch {GLOBAL_BATCH}; {settings.steps} steps per run, the first {WARMUP} "
        f"not timed; {datetime.datetime.now():%Y-%m-%d %H:%M}",
        "",
        "| rank | cap | largest micro-batch (probe) | micro-batches (plan) | accum | "
        "predicted peak (+DDP buckets) | measured peak | reserved peak | OOM | "
        "synced backwards / step | gradient buckets / step | other all-reduces / step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rep in reports:
        r, prof, run = rep["rank"], rep["profile"], rep["runs"]["plan"]
        me = plan.ranks[r]
        lines.append(
            f"| {r} | {_mib(rep['cap_bytes'])} | {prof['max_micro_batch']} | "
            f"{'+'.join(map(str, me.micro_batches))} | "
            f"{me.accumulation_steps} | {_mib(prof['predicted_peak_bytes'])} "
            f"({_mib(prof['predicted_peak_bytes'] + prof['ddp_bucket_bytes'])}) | "
            f"{_mib(run['peak_bytes'])} | {_mib(run['reserved_bytes'])} | none | "
            f"{_set(run['syncs_per_step'])} | {_set(run['buckets_per_step'])} | "
            f"{_set(run['other_all_reduces_per_step'])} |"
        )
    p, e = (reports[0]["runs"][k] for k in ("plan", "equal split"))
    lines += [
        "",
        f"- plan: {plan.summary_lines()[0]}",
        f"- equal split: micro-batch {max(r.micro_batch_size for r in equal.ranks)} x "
        f"{max(r.accumulation_steps for r in equal.ranks)} on every rank",
        f"- measured: plan {p['samples_per_s']:.1f} samples/s, equal split "
        f"{e['samples_per_s']:.1f} samples/s: {p['samples_per_s'] / e['samples_per_s']:.2f}x; "
        f"loss {p['first_loss']:.3f} -> {p['last_loss']:.3f} (plan), "
        f"{e['first_loss']:.3f} -> {e['last_loss']:.3f} (equal split)",
        f"- first step's gradient vs the single-process full-batch reference: relative L2 error "
        f"{errors['plan_vs_ref']:.2e} ({settings.precision} reference); the {settings.precision} "
        f"reference itself vs fp32: {errors['ref_vs_fp32']:.2e}; plan vs fp32 reference "
        f"{errors['plan_vs_fp32']:.2e}; in fp32 (a plan at a third of each micro-batch limit, "
        f"micro-batches {reports[0]['plan32_micro_batches']}) vs the fp32 reference: "
        f"{errors['plan32_vs_fp32']:.2e}",
    ]
    return lines


def verdict(reports: list[dict], errors: dict[str, float]) -> list[str]:
    """The checks that must hold; empty when all do."""
    bad = []
    for rep in reports:
        for label, run in rep["runs"].items():
            if set(run["syncs_per_step"]) != {1} or set(run["other_all_reduces_per_step"]) != {0}:
                bad.append(f"rank {rep['rank']} {label}: not exactly one gradient all-reduce")
    if errors["plan_vs_ref"] > max(1e-4, 2 * errors["ref_vs_fp32"]):
        bad.append(f"{reports[0]['profile']['precision']} gradient error above its own noise")
    if errors["plan32_vs_fp32"] > 1e-5:
        bad.append("fp32 gradient error > 1e-5")
    return bad


def write_results(lines: list[str]) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else ""
    section = "\n".join([BEGIN, *lines, END])
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## GPU check\n\n" + section + "\n"
    RESULTS.write_text(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps-gib", type=float, nargs="+", default=[4.0, 2.5, 1.5])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--cpu", action="store_true", help="functional check without a GPU")
    parser.add_argument("--caps-mib", type=float, nargs="+", default=[32.0, 12.0, 8.0])
    args = parser.parse_args()
    if args.steps <= WARMUP + 1:
        parser.error(f"--steps must be > {WARMUP + 1}")
    return args


def main() -> int:
    args = parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: this check needs an NVIDIA GPU (or --cpu)", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    bf16 = args.cpu or torch.cuda.is_bf16_supported()
    caps = [c * 2**20 for c in args.caps_mib] if args.cpu else [c * 2**30 for c in args.caps_gib]
    if not args.cpu and sum(caps) > 0.8 * torch.cuda.get_device_properties(0).total_memory:
        print(f"--caps-gib {args.caps_gib} do not fit this GPU with room for 3 CUDA contexts")
        return 2
    with tempfile.TemporaryDirectory() as out:
        settings = Settings(
            tuple(int(c) for c in caps),
            args.steps,
            args.cpu,
            "bf16" if bf16 else "fp16",
            free_port(),
            out,
        )
        mp.start_processes(rank_main, (settings,), nprocs=settings.world, start_method="spawn")
        reports = [
            json.loads(pathlib.Path(f"{out}/rank{r}.json").read_text())
            for r in range(settings.world)
        ]
        saved = torch.load(f"{out}/grads.pt")
    ref, chunk = reference_grads(settings, settings.precision)
    ref32, chunk32 = reference_grads(settings, "fp32")
    errors = {
        "plan_vs_ref": rel_error(saved["grads"], ref),
        "ref_vs_fp32": rel_error(ref, ref32),
        "plan_vs_fp32": rel_error(saved["grads"], ref32),
        "plan32_vs_fp32": rel_error(saved["grads32"], ref32),
    }
    lines = report_lines(settings, reports, errors)
    if (chunk, chunk32) != (GLOBAL_BATCH, GLOBAL_BATCH):
        lines.append(
            f"- the reference ran in chunks of {chunk} ({settings.precision}) and "
            f"{chunk32} (fp32) samples: the full batch did not fit the GPU"
        )
    bad = verdict(reports, errors)
    lines.append(
        f"- checks: {'all passed' if not bad else 'FAILED: ' + '; '.join(bad)}; "
        f"total {time.perf_counter() - t_start:.0f} s"
    )
    print("\n".join(lines))
    if not (args.no_write or args.cpu):  # a CPU run is not a GPU result
        write_results(lines)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
