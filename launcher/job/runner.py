"""Run one job on a Ray cluster: reserve, probe, plan, train, recover.

    connect -> reserve bundles -> probe (inventory, then one profile per device type)
      -> plan -> [start training actors -> rendezvous -> train]*  -> summary

The bracketed part repeats after a failure, from the last checkpoint, at most
`max_restarts` times: a lost worker restarts every rank; an out-of-memory in the
synced backward lowers that device's micro-batch; a device whose node is gone
is planned out (same global batch). Every actor and the placement group are
removed on the way out, whatever happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import ray
from ray.exceptions import RayActorError, RayTaskError

from autobatch.errors import AutobatchError, LaunchError
from autobatch.metrics.snapshot import RankSnapshot
from autobatch.planning.plan import Plan
from autobatch.planning.planner import equal_split_plan, make_plan
from autobatch.probe.devices import normalise_speeds
from autobatch.step.precision import choose_precision
from launcher.job import cluster
from launcher.job.checkpoint import latest_checkpoint
from launcher.job.spec import JobSpec
from launcher.job.worker import RankContext, RankOutcome, lower_micro_batches

Listener = Callable[[str, dict], None]  # (event, details): plan, progress, restart, done


@dataclass(frozen=True)
class JobSummary:
    job: str
    steps: int
    seconds: float
    samples_per_s: float
    restarts: int
    oom_events: int
    replans: dict[str, int]
    checkpoint: str | None
    plan: Plan
    parameters: dict | None = None
    output: str | None = None  # the trained model, for tasks that save one


class JobCancelled(LaunchError):
    """The runner's `stop` event was set (the job was cancelled); everything was cleaned up."""


FAILURE_GRACE_S = 2.0  # how long the other ranks have to report after one fails


class _Failure(Exception):
    def __init__(self, kind: str, rank: int, message: str) -> None:
        super().__init__(message)
        self.kind, self.rank = kind, rank  # kind: "oom" (synced backward), "lost", "error"


class JobRunner:
    def __init__(
        self,
        spec: JobSpec,
        *,
        address: str | None = None,
        runs_root: str = "runs",
        listener: Listener | None = None,
        metrics_host: str = "127.0.0.1",
        stop: threading.Event | None = None,
        collector_factory: Callable[[], object] | None = None,
    ) -> None:
        """`stop`: set it to cancel the job (checked between phases and every 0.5 s while
        training; raises JobCancelled). `collector_factory`: makes the Ray actor the ranks
        push snapshots to (default: a MetricsCollector serving its own /metrics)."""
        self.spec = spec
        self.stop = stop
        self.collector_factory = collector_factory
        self.address = address
        self.runs_root = runs_root
        self.listener = listener or (lambda event, details: None)
        self.metrics_host = metrics_host
        self.started_ray = False
        self.pg = None
        self.actors: list = []  # the ranks' workers, in rank order
        self.workers: dict = {}  # bundle -> a probed worker not yet given a rank
        self.collector = None
        self.phase_s: dict[str, float] = {}  # seconds per start-up phase, for benchmarks
        self.notes: list[str] = []  # choices made on the way, carried into the plan
        self._t = time.monotonic()

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise JobCancelled(f"job {self.spec.name} was cancelled")

    def _phase(self, name: str) -> None:
        now = time.monotonic()
        self.phase_s[name] = now - self._t
        self._t = now

    # -- public entry points ------------------------------------------------
    def probe_and_plan(self) -> tuple[Plan, list[cluster.ProbedDevice]]:
        with self._session():
            return self._probe_and_plan()

    def run(self) -> JobSummary:
        with self._session():
            plan, devices = self._probe_and_plan()
            self.listener("plan", {"plan": plan, "devices": devices})
            return self._train(plan, devices)

    # -- phases -------------------------------------------------------------
    @contextlib.contextmanager
    def _session(self) -> Iterator[None]:
        """Connected to Ray while inside; every actor and bundle removed on the way out."""
        n = sum(s.count for s in self.spec.devices.simulated)
        self._t = time.monotonic()
        try:
            self.started_ray = cluster.connect(self.address, num_cpus=max(4, n + 2))
            self._phase("ray_start")
            yield
        finally:
            self._cleanup()

    def _probe_and_plan(self) -> tuple[Plan, list[cluster.ProbedDevice]]:
        requests = cluster.device_requests(self.spec)
        if any(r.simulated for r in requests):
            sims = normalise_speeds([r.simulated for r in requests])
            requests = [replace(r, simulated=s) for r, s in zip(requests, sims)]
        self.requests = requests
        self._check_stop()
        self.pg = cluster.reserve(requests)
        self._phase("reserve")
        self._check_stop()
        devices = self._probe(requests)
        self._phase("probe")
        self._check_stop()
        capacities = [d.profile.capacity(d.device_id, d.info.name) for d in devices]
        if self.spec.planner == "equal_split":
            plan = equal_split_plan(self.spec.global_batch_size, capacities)
        else:
            plan = make_plan(
                self.spec.global_batch_size, capacities, keep_all=self.spec.devices.keep_all
            )
        checkpointed = sorted({d.info.name for d in devices if d.profile.gradient_checkpointing})
        self.notes += [
            f"gradient checkpointing on {name}: micro-batch 1 does not fit without it"
            for name in checkpointed
        ]
        plan = replace(plan, notes=(*plan.notes, *self.notes))
        self._phase("plan")
        return plan, devices

    def _probe(self, requests: list[cluster.DeviceRequest]) -> list[cluster.ProbedDevice]:
        """Start one worker per bundle; inventory every device, then measure one device of
        each type (one at a time, so timings are not disturbed); the others share it."""
        self.workers = {
            i: cluster.DeviceWorker.options(**cluster.in_bundle(self.pg, i, r)).remote()
            for i, r in enumerate(requests)
        }
        try:
            found = cluster.wait_all(
                [self.workers[i].inventory.remote(r.simulated, i) for i, r in enumerate(requests)],
                cluster.ACTOR_TIMEOUT_S,
                "device inventory",
            )
            self._resolve_precision([info for info, _, _ in found])
            by_type: dict[tuple, int] = {}
            for i, (info, _, _) in enumerate(found):
                by_type.setdefault((info.name, info.total_bytes, info.speed), i)
            cache = cluster.profile_cache_dir()
            profiles = {}
            for key, i in by_type.items():
                ref = self.workers[i].profile.remote(self.spec, found[i][0], cache)
                profiles[key] = cluster.wait_all([ref], 600, f"profile of {key[0]}")[0]
        except RayTaskError as exc:
            raise LaunchError(f"probe failed: {_cause(exc)}") from None
        return sorted(
            (
                cluster.ProbedDevice(
                    i, info, ip, node_id, profiles[(info.name, info.total_bytes, info.speed)]
                )
                for i, (info, ip, node_id) in enumerate(found)
            ),
            key=lambda d: (d.node, d.node_id, d.info.index, d.bundle),
        )

    def _resolve_precision(self, infos: list) -> None:
        """precision: auto becomes the precision every device supports, noted in the plan."""
        if self.spec.precision == "auto":
            precision, why = choose_precision(infos)
            self.spec = self.spec.model_copy(update={"precision": precision})
            self.notes.append(f"precision {precision} (auto): {why}")

    def _train(self, plan: Plan, devices: list[cluster.ProbedDevice]) -> JobSummary:
        spec = self.spec
        if self.collector_factory is not None:
            self.collector = self.collector_factory()
        else:
            self.collector = cluster.MetricsCollector.options(**cluster.on_this_node()).remote(
                self.metrics_host, spec.metrics_port or 0
            )
        self.listener("metrics", {"url": ray.get(self.collector.url.remote())})
        ckpt_dir = spec.checkpoint_dir(self.runs_root)
        resume = (
            str(latest_checkpoint(ckpt_dir))
            if spec.checkpoint.resume and latest_checkpoint(ckpt_dir)
            else None
        )
        if resume:
            self.listener("resume", {"checkpoint": resume})
        restarts, replans, attempt = 0, {}, 0
        t0 = time.monotonic()
        while True:
            try:
                outcomes = self._attempt(
                    plan, devices, ckpt_dir, resume, attempt, restarts, replans
                )
                break
            except _Failure as failure:
                self._stop_workers()
                self._check_stop()
                restarts += 1
                if restarts > spec.max_restarts:
                    raise LaunchError(
                        f"job {spec.name} failed after {restarts - 1} restart(s): {failure}"
                    ) from None
                plan, reason = self._recover(plan, devices, failure)
                if reason:
                    replans[reason] = replans.get(reason, 0) + 1
                resume = str(latest_checkpoint(ckpt_dir)) if latest_checkpoint(ckpt_dir) else None
                attempt += 1
                self.listener(
                    "restart",
                    {
                        "reason": str(failure),
                        "kind": failure.kind,
                        "restarts": restarts,
                        "plan": plan,
                        "resume": resume,
                    },
                )
        seconds = time.monotonic() - t0
        final = Plan.from_json(outcomes[0].final_plan_json)
        steps = outcomes[0].steps_done
        summary = JobSummary(
            job=spec.name,
            steps=steps,
            seconds=seconds,
            samples_per_s=steps * spec.global_batch_size / seconds if seconds else 0.0,
            restarts=restarts,
            oom_events=sum(o.oom_events for o in outcomes) + replans.get("oom", 0),
            replans=replans,
            checkpoint=outcomes[0].checkpoint,
            plan=final,
            parameters=outcomes[0].parameters,
            output=outcomes[0].output,
        )
        self.listener("done", {"summary": summary})
        return summary

    def _recover(
        self, plan: Plan, devices: list[cluster.ProbedDevice], failure: _Failure
    ) -> tuple[Plan, str | None]:
        """The plan for the next attempt, and why it changed (None: unchanged)."""
        if failure.kind == "oom":
            return lower_micro_batches(plan, [failure.rank]), "oom"
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        lost = {d.device_id for d in devices if d.node_id not in alive}
        if lost:
            left = [d for d in plan.inputs if d.device_id not in lost]
            if not left:
                raise LaunchError("every device of the job is gone; nothing to re-plan on")
            keep_all = self.spec.devices.keep_all
            return make_plan(plan.global_batch_size, left, keep_all=keep_all), "device_lost"
        return plan, None

    def _attempt(
        self,
        plan: Plan,
        devices: list[cluster.ProbedDevice],
        ckpt_dir: pathlib.Path,
        resume: str | None,
        attempt: int,
        restarts: int,
        replans: dict,
    ) -> list[RankOutcome]:
        by_id = {d.device_id: d for d in devices}
        ranked = [by_id[r.device_id] for r in plan.ranks]
        self.actors = [self._worker(d.bundle) for d in ranked]
        for bundle in list(self.workers):  # probed devices the plan left out
            ray.kill(self.workers.pop(bundle))
        addresses = self._collect([a.address.remote() for a in self.actors], "training actors")
        self._phase("start_workers")
        ip, port, _ = addresses[0]
        backend = "nccl" if all(d.info.is_cuda for d in ranked) else "gloo"
        world = len(ranked)
        master = f"tcp://{ip}:{port}"
        joins = [a.join.remote(master, r, world, backend, 120) for r, a in enumerate(self.actors)]
        self._collect(joins, "process group set-up")
        self._phase("process_group")
        refs = []
        for rank, (actor, d) in enumerate(zip(self.actors, ranked)):
            ctx = RankContext(
                job=self.spec.name,
                spec=self.spec,
                plan_json=plan.to_json(),
                rank=rank,
                device=d.info,
                node=d.node,
                checkpoint_dir=str(ckpt_dir),
                output_dir=str(self.spec.output_path(self.runs_root)),
                resume_from=resume,
                attempt=attempt,
                speed=d.info.speed,
                backward_factor=d.profile.backward_factor,
                restarts=restarts,
                replans=dict(replans),
            )
            refs.append(actor.train.remote(ctx, self.collector))
        return self._wait(refs)

    def _worker(self, bundle: int):  # noqa: ANN202
        """The bundle's probe worker on the first attempt; a fresh one after a failure."""
        if bundle in self.workers:
            return self.workers.pop(bundle)
        return cluster.DeviceWorker.options(
            **cluster.in_bundle(self.pg, bundle, self.requests[bundle])
        ).remote()

    def _collect(self, refs: list, what: str) -> list:
        try:
            return cluster.wait_all(refs, cluster.ACTOR_TIMEOUT_S, what)
        except (RayActorError, RayTaskError) as exc:
            raise _Failure("lost", -1, f"{what}: {_cause(exc)}") from None

    def _wait(self, refs: list) -> list[RankOutcome]:
        pending = list(refs)
        while pending:
            self._check_stop()
            done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            failures = [f for ref in done if (f := _failure_of(refs, ref))]
            if failures:
                # The first failure is often a consequence (a peer's collective breaking):
                # give the other ranks a moment to fail too, and judge by the root cause.
                more, _ = ray.wait(pending, num_returns=len(pending), timeout=FAILURE_GRACE_S)
                raise _worst(failures + [f for ref in more if (f := _failure_of(refs, ref))])
            self._progress()
        return ray.get(refs)

    def _progress(self) -> None:
        if self.collector is None:
            return
        snaps: list[RankSnapshot] = ray.get(self.collector.latest.remote())
        if snaps and "first_step" not in self.phase_s:
            self._phase("first_step")
        if snaps:
            self.listener("progress", {"snapshots": snaps})

    # -- clean-up -------------------------------------------------------------
    def _stop_workers(self) -> None:
        for a in [*self.actors, *self.workers.values()]:
            ray.kill(a, no_restart=True)
        self.actors, self.workers = [], {}

    def _cleanup(self) -> None:
        if ray.is_initialized():
            self._stop_workers()
            if self.collector is not None:
                ray.kill(self.collector)
                self.collector = None
            if self.pg is not None:
                ray.util.remove_placement_group(self.pg)
                self.pg = None
            if self.started_ray:
                ray.shutdown()


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _failure_of(refs: list, ref: object) -> _Failure | None:
    """What went wrong on the rank of a finished `ref`, or None when it succeeded."""
    rank = refs.index(ref)
    try:
        ray.get(ref)
    except RayActorError as exc:
        return _Failure("lost", rank, f"rank {rank} worker died: {_cause(exc)}")
    except RayTaskError as exc:
        return _Failure(_failure_kind(exc), rank, f"rank {rank}: {_cause(exc)}")
    return None


def _worst(failures: list[_Failure]) -> Exception:
    """One exception for the failures of an attempt: an error in the task fails the job; an
    out-of-memory (lower that device) comes before a lost worker. The message lists all."""
    order = {"error": 0, "oom": 1, "lost": 2}
    failures = sorted(failures, key=lambda f: (order[f.kind], f.rank))
    first = failures[0]
    message = "; ".join(str(f) for f in failures)
    if first.kind == "error":
        return LaunchError(f"the task failed: {message}")
    return _Failure(first.kind, first.rank, message)


def _failure_kind(exc: RayTaskError) -> str:
    """'oom': lower that device and restart. 'error': bad input or a bug in the task, which
    a restart would only repeat: fail the job. 'lost': anything else (a collective that
    failed because a peer died or timed out, gloo's plain RuntimeErrors): restart."""
    import torch

    cause = getattr(exc, "cause", None)
    if isinstance(cause, torch.OutOfMemoryError):
        return "oom"
    if isinstance(
        cause,
        (
            AutobatchError,
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            ImportError,
            NotImplementedError,
        ),
    ):
        return "error"
    return "lost"


def summary_dict(summary: JobSummary) -> dict:
    out = dataclasses.asdict(summary)
    out.pop("parameters", None)
    out["plan"] = summary.plan.to_dict()
    return out
