"""`autobatch` command line: run, plan, probe, and the daemon (serve, submit, jobs, ...).

Every failure a user can cause ends with one line `error: ...` and exit code 2;
an unexpected failure keeps its traceback and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich import progress as bar
from rich.console import Console
from rich.table import Table
from rich.text import Text

from autobatch.errors import AutobatchError
from autobatch.planning.plan import Plan
from launcher.job.events import (
    Finished,
    JobSummary,
    MetricsAt,
    Planned,
    Progress,
    Rebalanced,
    Resized,
    Restarting,
    Resuming,
    RunnerEvent,
    describe_rebalance,
    describe_resize,
)

if TYPE_CHECKING:
    from autobatch.probe.whatif import LMJob, WhatIf
    from launcher.job.spec import JobSpec

console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 160)


def plan_table(plan: Plan, title: str = "plan") -> Table:
    rows = plan.table_rows()
    table = Table(title=title)
    for h in rows[0]:
        table.add_column(h, justify="left" if h == "device" else "right")
    for row in rows:
        table.add_row(*(Text(v) for v in row.values()))
    return table


def print_plan(plan: Plan) -> None:
    out.print(plan_table(plan))
    for line in plan.summary_lines():
        out.print(Text(line))


class _Display:
    """Turns runner events into a rich progress bar and messages."""

    def __init__(self, total_steps: int | None) -> None:
        self.progress = bar.Progress(
            bar.TextColumn("[bold]step {task.completed}/{task.total}"),
            bar.BarColumn(),
            bar.TextColumn("loss {task.fields[loss]}"),
            bar.TextColumn("{task.fields[rate]} samples/s"),
            bar.TextColumn("global batch {task.fields[batch]}"),
            bar.TimeElapsedColumn(),
            console=out,
            transient=False,
        )
        self.task = None
        self.total = total_steps
        self.t0 = time.monotonic()
        self.first_step = None

    def __call__(self, event: RunnerEvent) -> None:
        # Text from a job (paths, a rank's error) is data: printed as Text, never as markup.
        match event:
            case Planned(plan=plan):
                print_plan(plan)
            case MetricsAt(url=url):
                out.print(Text(f"metrics: {url}"))
            case Resuming(checkpoint=checkpoint):
                out.print(Text(f"resuming from {checkpoint}"))
            case Restarting(decision=decision, restarts=restarts):
                out.print(Text.assemble((f"restart {restarts}", "yellow"), f": {decision.reason}"))
                if decision.replan:
                    print_plan(decision.plan)
            case Resized() as r:
                out.print(Text.assemble(("resized", "yellow"), f": {describe_resize(r)}"))
            case Rebalanced() as r:
                out.print(Text(describe_rebalance(r), style="cyan"))
            case Progress(snapshots=snapshots):
                self._progress(snapshots)
            case Finished(summary=summary):
                self._done(summary)

    def _progress(self, snaps: list) -> None:
        rank0 = next((s for s in snaps if s.rank == 0), None)
        if rank0 is None:
            return
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task(
                "train", total=self.total, loss="-", rate="-", batch="-"
            )
            self.first_step = (time.monotonic(), rank0.step)
        t, s = self.first_step
        elapsed = time.monotonic() - t
        rate = (rank0.step - s) * rank0.global_batch_size / elapsed if elapsed > 0 else 0.0
        self.progress.update(
            self.task,
            completed=rank0.step,
            loss=f"{rank0.train_loss:.4f}" if rank0.train_loss is not None else "-",
            rate=f"{rate:,.0f}",
            batch=f"{rank0.effective_global_batch_size}/{rank0.global_batch_size}",
        )

    def _done(self, summary: JobSummary) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=summary.steps)
            self.progress.stop()
        out.print(
            Text(
                f"done: {summary.steps} steps in {summary.seconds:.1f} s, "
                f"{summary.samples_per_s:,.1f} samples/s, restarts {summary.restarts}, "
                f"OOM events {summary.oom_events}, checkpoint {summary.checkpoint}"
                + (f", trained model in {summary.output}" if summary.output else "")
            )
        )


def cmd_run(args: argparse.Namespace) -> int:
    from launcher.job.controller import JobController
    from launcher.job.spec import load_spec
    from launcher.job.storage import check_storage

    spec = load_spec(args.spec)
    # writable, before any device is reserved (one line and exit code 2 when not)
    check_storage(spec.checkpoint_dir(args.runs_dir), spec.output_path(args.runs_dir))
    display = _Display(spec.max_steps)
    summary = JobController(
        spec, address=args.address, runs_root=args.runs_dir, listener=display
    ).run()
    if args.json:
        out.print_json(json.dumps(summary.to_dict()))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from launcher.job.spec import load_spec

    spec = load_spec(args.spec)
    if args.dry_run or args.what_if:
        if not args.devices:
            flag = "--what-if" if args.what_if else "--dry-run"
            raise AutobatchError(f"{flag} needs --devices, e.g. --devices '2xA100-80GB,4xT4-16GB'")
        return _what_if(spec, args) if args.what_if else _dry_run(spec, args)
    if args.devices:
        raise AutobatchError(
            "--devices is only for --dry-run and --what-if (planning without hardware)"
        )
    from launcher.job.controller import JobController

    plan, _ = JobController(spec, address=args.address).probe_and_plan()
    if args.json:
        print(plan.to_json())
    else:
        print_plan(plan)
    return 0


def _dry_run(spec: JobSpec, args: argparse.Namespace) -> int:
    """One plan from estimates: a causal LM from its config alone (depth-scaled, fast), any
    other task from a trace of its whole model."""
    from autobatch.planning.planner import make_plan
    from autobatch.probe.estimate import estimate_capacities
    from autobatch.probe.whatif import estimate_lm_capacities
    from launcher.job.optim import build_optimizer
    from launcher.job.tasks import load_task

    job = _lm_job(spec)
    if job is not None:
        capacities = estimate_lm_capacities(job, args.devices)
    else:
        capacities = estimate_capacities(
            load_task(spec),
            args.devices,
            make_optimizer=build_optimizer(spec.optimizer),
            precision=spec.precision,
            headroom_fraction=spec.memory_headroom,
        )
    plan = make_plan(
        spec.global_batch_size, capacities, keep_all=spec.devices.keep_all, sharding=spec.sharding
    )
    if args.json:
        print(plan.to_json())
        return 0
    print_plan(plan)
    out.print("[dim]all figures are estimates (no hardware was measured)[/]")
    if job is not None:
        out.print(
            "[dim]every precision, LoRA, checkpointing and sharding combination: --what-if[/]"
        )
    return 0


def _what_if(spec: JobSpec, args: argparse.Namespace) -> int:
    """Every lever combination of a causal-LM job, on the declared devices."""
    from autobatch.probe.whatif import what_if

    job = _lm_job(spec)
    if job is None:
        raise AutobatchError(
            f"--what-if needs task causal_lm (a model_dir with a config.json), got "
            f"task={spec.task!r}; --dry-run plans any task for its own settings"
        )
    t0 = time.monotonic()
    result = what_if(job, args.devices)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    out.print(what_if_table(result))
    for line in result.summary_lines():
        out.print(Text(line))
    out.print(Text(f"estimated in {time.monotonic() - t0:.1f} s", style="dim"))
    return 0


def what_if_table(result: WhatIf) -> Table:
    """Rows: lever combinations, one section per precision; the spec's and the fastest bold."""
    rows = result.table_rows()
    words = {"", "precision", "LoRA", "ckpt", "sharding", "why not"}
    table = Table(title=f"what if: {result.model}, global batch {result.global_batch_size}")
    for h in rows[0]:
        table.add_column(h, justify="left" if h in words else "right", overflow="fold")
    for row, after in zip(rows, [*rows[1:], None]):
        last_of_precision = after is None or after["precision"] != row["precision"]
        style = "bold" if row[""] else None
        table.add_row(*(Text(v) for v in row.values()), style=style, end_section=last_of_precision)
    return table


def _lm_job(spec: JobSpec) -> LMJob | None:
    """The what-if's view of a causal-LM job (None for any other task): the model's config,
    the spec's levers, and its LoRA adapter (a default one when it has none)."""
    from autobatch.probe.whatif import LMJob
    from autobatch.tasks.lora import LoraSpec
    from launcher.job.optim import build_optimizer
    from launcher.job.tasks import CausalLMArgs

    if spec.task != "causal_lm":
        return None
    args = CausalLMArgs.model_validate(spec.task_args)  # the spec validated it already
    return LMJob(
        model_dir=args.model_dir,
        max_seq_len=spec.max_seq_len,
        global_batch_size=spec.global_batch_size,
        make_optimizer=build_optimizer(spec.optimizer),
        lora=args.lora or LoraSpec(),
        dtype=args.dtype,
        headroom_fraction=spec.memory_headroom,
        keep_all=spec.devices.keep_all,
        own_precision=spec.precision,
        own_lora=args.lora is not None,
        own_gradient_checkpointing=args.gradient_checkpointing,
        own_sharding=spec.sharding,
    )


def cmd_probe(args: argparse.Namespace) -> int:
    from launcher.job import cluster
    from launcher.job.spec import load_spec

    spec = load_spec(args.spec) if args.spec else None
    started = cluster.connect(args.address)
    try:
        rows = cluster.list_devices(spec)
    finally:
        if started:
            import ray

            ray.shutdown()
    table = Table(title="devices")
    for h in ("node", "device", "memory", "kind", "uuid"):
        table.add_column(h)
    for r in rows:
        cells = (r["node"], r["name"], f"{r['total_bytes'] / 2**30:.2f} GiB", r["kind"], r["uuid"])
        table.add_row(*(Text(c) for c in cells))
    out.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autobatch", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="probe, plan and train a job on a Ray cluster")
    run.add_argument("spec", help="job spec (YAML)")
    run.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument("--runs-dir", default="runs", help="where checkpoints go (default: runs/)")
    run.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="probe and plan without training")
    plan.add_argument("spec", help="job spec (YAML)")
    plan.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument(
        "--dry-run",
        action="store_true",
        help="plan from estimates, without hardware (needs --devices)",
    )
    plan.add_argument(
        "--what-if",
        action="store_true",
        help="causal_lm jobs: estimate and plan every combination of precision, LoRA, "
        "gradient checkpointing and sharding from the model's config.json alone (no weights, "
        "tokenizer or data), without hardware (needs --devices); implies --dry-run",
    )
    plan.add_argument(
        "--devices",
        help="declared devices for --dry-run/--what-if, e.g. '2xA100-80GB,4xT4-16GB'",
    )
    plan.set_defaults(func=cmd_plan)

    probe = sub.add_parser("probe", help="list every device of the cluster")
    probe.add_argument("spec", nargs="?", help="job spec: also list its simulated devices")
    probe.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    probe.set_defaults(func=cmd_probe)

    from launcher.daemon import client

    client.add_commands(sub)  # serve, submit, jobs, status, cancel, logs
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AutobatchError as exc:
        console.print(Text.assemble(("error:", "red"), f" {exc}"), highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as rich's output does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the exit's flush
        return 1


if __name__ == "__main__":
    sys.exit(main())
