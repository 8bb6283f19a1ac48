"""Checkpoints: save and restore time, the training stall per save, steps lost to a kill -9.

    .venv/bin/python benchmarks/bench_checkpoint.py [--repeats 5] [--steps 24 --interval 4]

1. Save and restore time (one process, the launcher's code: launcher.job.checkpoint) of
   the demo model (configs/demo.yaml: a replica, one torch file) and of the sharded
   config's model (configs/sharded.yaml: DCP shards, written here by one process, so one
   shard file; the multi-rank sharded save is timed in part 2's job metrics only as a
   stall), each with AdamW state after one step, to a local folder and to an S3-compatible
   server on loopback (moto's ThreadedMotoServer on 127.0.0.1, as tests/conftest.py).
   The median of --repeats.
2. The training stall per save: the demo job (its devices and model; --steps steps,
   a checkpoint every --interval steps) through the launcher on a local Ray, with
   `checkpoint.async` true and false; from the ranks' metrics, per save the longest
   `autobatch_checkpoint_stall_seconds` over the ranks, over the median step time.
   Goal (issue 25): <= 10% of a step with async saves.
3. Steps redone after kill -9 of a rank (the same job, audit ledger on): the steps the
   ledger shows tried by more than one attempt, for a kill between saves (`crash`, the
   worst place: the step before the next checkpoint) and a kill while a background write
   is in flight (`crash_in_save`). Goal: at most one checkpoint interval.

A busy 2-core machine: read ratios within one run, not absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator

import ray
import torch
import yaml

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from ledger import exact_global_batches, rank_lines  # noqa: E402

from autobatch.step.shard import Sharded  # noqa: E402
from autobatch.step.wrap import REPLICATED  # noqa: E402
from launcher.job.checkpoint import restore_checkpoint, save_checkpoint  # noqa: E402
from launcher.job.controller import JobController  # noqa: E402
from launcher.job.events import Progress  # noqa: E402
from launcher.job.optim import build_optimizer  # noqa: E402
from launcher.job.spec import parse_spec  # noqa: E402
from launcher.job.tasks import load_task  # noqa: E402

CONFIGS = HERE.parent / "configs"


def config(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, one bucket; the environment botocore reads set."""
    import logging
    import os

    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line a request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    fsspec.filesystem("s3", endpoint_url=f"http://{host}:{port}", skip_instance_cache=True).mkdir(
        "bench"
    )
    try:
        yield "s3://bench"
    finally:
        server.stop()


def model_of(spec: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The config's model and optimizer after one step (the optimizer's state exists)."""
    parsed = parse_spec(spec)
    task = load_task(parsed)
    torch.manual_seed(0)
    model = task.build_model()
    optimizer = build_optimizer(parsed.optimizer)(model)
    batch = task.batch(list(range(4)))
    task.loss_fn(model, batch).backward()
    optimizer.step()
    return model, optimizer


def save_restore(where: str, name: str, repeats: int) -> tuple[float, float, int]:
    """(median save s, median restore s, checkpoint bytes) of config `name` at `where`."""
    spec = config(name)
    wrapping = REPLICATED if name == "demo" else Sharded("optimizer")
    model, optimizer = model_of(spec)
    saves, restores = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        path = save_checkpoint(where, i + 1, wrapping, model, optimizer, {"step": i + 1}, keep=1)
        saves.append(time.perf_counter() - t0)
        fresh, fresh_optimizer = model_of(spec)
        t0 = time.perf_counter()
        restore_checkpoint(path, wrapping, fresh, fresh_optimizer)
        restores.append(time.perf_counter() - t0)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size += sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    return statistics.median(saves), statistics.median(restores), size


def demo_job(tmp: pathlib.Path, label: str, steps: int, interval: int, **over) -> dict:
    spec = config("demo")
    spec.update(name=f"ckpt-{label}", max_steps=steps, audit_samples=True)
    spec["checkpoint"] = {"dir": str(tmp / label), "interval": interval, **over.pop("ckpt", {})}
    spec.update(over)
    return spec


def run_job(spec: dict, runs: pathlib.Path) -> list:
    snapshots: list = []

    def listener(event: object) -> None:
        if isinstance(event, Progress):
            snapshots.extend(event.snapshots)

    JobController(parse_spec(spec), listener=listener, runs_root=runs).run()
    return snapshots


def stall_ratio(snapshots: list, interval: int) -> tuple[list[float], float, list[float]]:
    """(per save: the longest stall over the ranks; the median step time; per save: the
    longest background write). A save at step k rides the snapshots of step k + 1."""
    stalls: dict[int, float] = {}
    writes: dict[int, float] = {}
    steps = []
    for s in snapshots:
        if s.step_duration_s is not None:
            steps.append(s.step_duration_s)
        saved = s.step - 1
        if s.checkpoint_stall_s is not None and saved % interval == 0 and saved > 0:
            stalls[saved] = max(stalls.get(saved, 0.0), s.checkpoint_stall_s)
        if s.checkpoint_write_s is not None and saved > interval and (saved % interval == 0):
            writes[saved] = max(writes.get(saved, 0.0), s.checkpoint_write_s)
    return [stalls[k] for k in sorted(stalls)], statistics.median(steps), list(writes.values())


def redone(ckpt: str) -> tuple[int, int]:
    """From the ledger: (steps tried by more than one attempt, the step the second attempt
    began at)."""
    tries: dict[int, set] = {}
    for _, line in rank_lines(ckpt):
        e = json.loads(line)
        tries.setdefault(e["step"], set()).add(e["attempt"])
    again = sorted(s for s, a in tries.items() if len(a) > 1)
    began = min((s for s, a in tries.items() if 1 in a), default=-1)
    return len(again), began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--interval", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the launcher's workers
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))

    print("1. save and restore (one process, synchronous save; median of", args.repeats, ")")
    with s3_server() as bucket:
        for name in ("demo", "sharded"):
            for store, where in (("local", str(tmp / f"local-{name}")), ("s3", f"{bucket}/{name}")):
                save_s, restore_s, size = save_restore(where, name, args.repeats)
                print(
                    f"RESULT {name} ({size / 2**20:.2f} MiB of model + optimizer state) "
                    f"{store}: save {save_s * 1e3:.1f} ms, restore {restore_s * 1e3:.1f} ms"
                )

    print(f"2. stall per save: demo job, {args.steps} steps, a checkpoint every {args.interval}")
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    try:
        ratios = {}
        for mode in (True, False):
            label = "async" if mode else "sync"
            spec = demo_job(tmp, label, args.steps, args.interval, ckpt={"async": mode})
            stalls, step_s, writes = stall_ratio(run_job(spec, tmp / "runs"), args.interval)
            ratio = statistics.median(stalls) / step_s
            ratios[label] = ratio
            write = (
                f", background write median {statistics.median(writes) * 1e3:.1f} ms"
                if (writes and mode)
                else ""
            )
            print(
                f"RESULT stall per save ({label}): median {statistics.median(stalls) * 1e3:.1f} "
                f"ms, max {max(stalls) * 1e3:.1f} ms over {len(stalls)} saves; median step "
                f"{step_s * 1e3:.1f} ms; stall / step {ratio:.1%}{write}"
            )
        goal = "met" if ratios["async"] <= 0.10 else "NOT met"
        print(
            f"goals: async stall per save <= 10% of a step: {ratios['async']:.1%} ({goal}); "
            f"sync {ratios['sync']:.1%}"
        )

        print("3. steps redone after kill -9 of rank 1 (a checkpoint every", args.interval, ")")
        worst = 0
        for kind, step in (
            ("crash", 2 * args.interval + args.interval - 1),
            ("crash_in_save", 2 * args.interval),
        ):
            rank = 1 if kind == "crash" else 0  # rank 0 writes a replica's checkpoint
            spec = demo_job(tmp, kind, args.steps, args.interval)
            spec["faults"] = [{"kind": kind, "rank": rank, "step": step}]
            run_job(spec, tmp / "runs")
            ckpt = spec["checkpoint"]["dir"]
            n, began = redone(ckpt)
            # `crash` kills between two steps: every step tried again had completed. A kill
            # in a background write comes while the loop runs the next step: that one was
            # cut short, not lost.
            lost = n if kind == "crash" else n - 1
            exact = exact_global_batches(
                ckpt, spec["task_args"]["dataset_size"], spec["global_batch_size"],
                spec["seed"], args.steps,
            )  # fmt: skip
            worst = max(worst, lost)
            print(
                f"RESULT kill -9 ({kind}, rank {rank}, step {step}): resumed at step {began}; "
                f"{lost} completed steps lost ({n} steps tried again); interval {args.interval}; "
                f"ledger exact: {exact}"
            )
        goal = "met" if worst <= args.interval else "NOT met"
        print(
            f"goals: completed steps lost to a kill -9 <= one interval ({args.interval}): "
            f"{worst} ({goal})"
        )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
