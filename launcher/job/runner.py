"""Run one job on a Ray cluster: reserve, probe, plan, train, recover.

    connect -> reserve bundles -> probe (inventory, then one profile per device type)
      -> plan -> [start training actors -> rendezvous -> train]*  -> summary

The bracketed part repeats after a failure, from the last checkpoint, as the
failure policy (`policy.decide`) says: restart, re-plan on the devices left, or
fail with the reason. The runner tells its listener what happens (`events`).

An elastic job (`devices.min_count`) also repeats it for a resize (`request_resize`,
from another thread): the ranks stop at the next step boundary with a checkpoint of
that step, the runner reserves, probes (the profile cache answers for known device
types) and plans the new devices, and the next attempt resumes at that step: the
same global batches, in the same order, on other devices.
Every actor and the placement group are removed on the way out, whatever happens.
"""

from __future__ import annotations

import contextlib
import pathlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import ray
from ray.exceptions import RayActorError, RayTaskError

from autobatch.errors import LaunchError, NoFitError
from autobatch.metrics.snapshot import RankSnapshot
from autobatch.planning.plan import ExcludedDevice, Plan
from autobatch.planning.planner import equal_split_plan
from autobatch.planning.sharded import make_sharded_plan
from autobatch.probe.cache import default_cache_dir
from autobatch.probe.devices import DeviceInfo, normalise_speeds
from autobatch.probe.profile import ModelProfile
from autobatch.step.precision import Precision, choose_precision
from launcher.job import cluster, policy
from launcher.job.checkpoint import checkpoint_step, latest_checkpoint
from launcher.job.collector import SnapshotCollector
from launcher.job.context import RankContext, RankOutcome
from launcher.job.events import (
    Finished,
    JobSummary,
    Listener,
    MetricsAt,
    Planned,
    Progress,
    Resized,
    Restarting,
    Resuming,
)
from launcher.job.policy import RankFailure
from launcher.job.spec import JobSpec
from launcher.job.worker import DeviceWorker


class JobCancelled(LaunchError):
    """The runner's `stop` event was set (the job was cancelled); everything was cleaned up."""


FAILURE_GRACE_S = 2.0  # how long the other ranks have to report after one fails


@dataclass(frozen=True)
class _ResizeRequest:
    devices: tuple[int, ...]
    reason: str  # grew | shrank
    why: str
    at: float  # time.monotonic() of the request


@dataclass(frozen=True)
class _Announce:
    """A resize done, to be announced once the new ranks finished a step."""

    request: _ResizeRequest
    before: tuple[int, ...]
    step: int


class _AttemptFailed(Exception):
    """An attempt ended with these failures (raised inside the runner only)."""

    def __init__(self, failures: list[RankFailure]) -> None:
        super().__init__("; ".join(map(str, failures)))
        self.failures = failures


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
        devices: Sequence[int] | None = None,
    ) -> None:
        """`stop`: set it to cancel the job (checked between phases and every 0.5 s while
        training; raises JobCancelled). `collector_factory`: makes the Ray actor the ranks
        push snapshots to, which its caller ends (default: a SnapshotCollector serving its
        own /metrics, ended with the run). `devices`: the spec's devices (indices into its
        device list) an elastic job starts on; default all of them."""
        self.spec = spec
        self.stop = stop
        self.collector_factory = collector_factory
        self.address = address
        self.runs_root = runs_root
        self.listener: Listener = listener or (lambda event: None)
        self.metrics_host = metrics_host
        self.started_ray = False
        self.pg = None  # a gang job's placement group (all its devices)
        self.pgs: dict = {}  # an elastic job's: one per device, by device index
        self.bundles: dict = {}  # device index -> (placement group, bundle)
        self.probed: dict[int, tuple] = {}  # device index -> (DeviceInfo, node ip, node id)
        self.actors: list = []  # the ranks' workers, in rank order
        self.workers: dict = {}  # device index -> a worker not (yet) given a rank
        self._ranked: list[int] = []  # the device index of each rank of this attempt
        self.collector = None
        self.phase_s: dict[str, float] = {}  # seconds per start-up phase, for benchmarks
        self.notes: list[str] = []  # choices made on the way, carried into the plan
        self.precision: Precision | None = None  # the spec's, with auto resolved
        self.precision_note: str | None = None
        self.profiles: dict[tuple, ModelProfile | str] = {}  # by device type, this run's
        self.active: list[int] | None = list(devices) if devices is not None else None
        self.all_requests: list[cluster.DeviceRequest] = []  # every device of the spec
        self.resizes: dict[str, int] = {}  # by reason, for the ranks' metrics
        self._resize: _ResizeRequest | None = None
        self._announce: _Announce | None = None
        self._resize_lock = threading.Lock()
        self._t = time.monotonic()

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise JobCancelled(f"job {self.spec.name} was cancelled")

    def _phase(self, name: str) -> None:
        now = time.monotonic()
        self.phase_s[name] = now - self._t
        self._t = now

    # -- public entry points ------------------------------------------------
    def request_resize(self, devices: Sequence[int], reason: str, why: str) -> None:
        """Move the job to `devices` (indices into the spec's devices) at the next step
        boundary; thread-safe. `reason`: grew or shrank, `why`: for the user."""
        if not self.spec.devices.elastic:
            raise LaunchError(f"job {self.spec.name} is not elastic (devices.min_count unset)")
        devices = tuple(sorted(set(devices)))
        check_devices(self.spec, devices, self.all_requests or None)
        with self._resize_lock:
            self._resize = _ResizeRequest(devices, reason, why, time.monotonic())
            collector = self.collector
        if collector is not None:
            collector.request_stop.remote()

    def _take_resize(self) -> _ResizeRequest | None:
        with self._resize_lock:
            req, self._resize = self._resize, None
            return req

    def probe_and_plan(self) -> tuple[Plan, list[cluster.ProbedDevice]]:
        with self._session():
            return self._probe_and_plan()

    def run(self) -> JobSummary:
        with self._session():
            plan, devices = self._probe_and_plan()
            self.listener(Planned(plan, devices))
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
        if not self.all_requests:
            requests = cluster.device_requests(self.spec)
            if any(r.simulated for r in requests):  # speeds relative to all of the spec's
                sims = normalise_speeds([r.simulated for r in requests])
                requests = [replace(r, simulated=s) for r, s in zip(requests, sims)]
            self.all_requests = requests
            if self.active is None:
                self.active = list(range(len(requests)))
            check_devices(self.spec, self.active, requests)
        self.notes = []
        self.requests = [self.all_requests[i] for i in self.active]
        self._check_stop()
        self._reserve()
        self._phase("reserve")
        self._check_stop()
        devices = self._probe()
        self._phase("probe")
        self._check_stop()
        fit = [d for d in devices if d.profile is not None]
        unfit = [ExcludedDevice(d.device_id, d.info.name, d.no_fit) for d in devices if d.no_fit]
        if not fit or (unfit and self.spec.devices.keep_all):
            why = (
                "no device can" if not fit else "devices.keep_all is set, but not every device can"
            )
            reasons = "; ".join(f"{e.device_id}: {e.reason}" for e in unfit)
            raise LaunchError(f"{why} train this job: {reasons}")
        capacities = [d.profile.capacity(d.device_id, d.info.name) for d in fit]
        if self.spec.planner == "equal_split":
            plan = equal_split_plan(self.spec.global_batch_size, capacities)
        else:
            plan = make_sharded_plan(
                self.spec.global_batch_size,
                capacities,
                self.spec.sharding,
                keep_all=self.spec.devices.keep_all,
            )
        checkpointed = sorted({d.info.name for d in fit if d.profile.gradient_checkpointing})
        self.notes += [
            f"gradient checkpointing on {name}: micro-batch 1 does not fit without it"
            for name in checkpointed
        ]
        plan = replace(plan, excluded=(*plan.excluded, *unfit), notes=(*plan.notes, *self.notes))
        self._phase("plan")
        return plan, devices

    def _reserve(self) -> None:
        """A gang job: one placement group for all its devices (all or nothing). An elastic
        job: one per device, so that a resize keeps the devices that stay (and their
        actors) and gives back those that go."""
        if not self.spec.devices.elastic:
            self.pg = cluster.reserve(self.requests)
            self.bundles = {i: (self.pg, b) for b, i in enumerate(self.active)}
            return
        self._release([i for i in self.pgs if i not in self.active])
        for i in self.active:
            if i not in self.pgs:
                self.pgs[i] = cluster.reserve([self.all_requests[i]])
        self.bundles = {i: (self.pgs[i], 0) for i in self.active}

    def _release(self, gone: Sequence[int]) -> None:
        """An elastic job's devices that left: their actors, reservations, inventory."""
        for i in gone:
            if i in self.workers:
                ray.kill(self.workers.pop(i), no_restart=True)
            if i in self.pgs:
                ray.util.remove_placement_group(self.pgs.pop(i))
            self.probed.pop(i, None)

    def _probe(self) -> list[cluster.ProbedDevice]:
        """Start a worker on each new device and take its inventory; measure one device of
        each type not measured yet in this run (one at a time, so timings are not
        disturbed); the others share its profile."""
        new = [i for i in self.active if i not in self.probed]
        for i in new:
            self.workers[i] = self._new_worker(i)
        try:
            found = cluster.wait_all(
                [self.workers[i].inventory.remote(self.all_requests[i].simulated, i) for i in new],
                cluster.ACTOR_TIMEOUT_S,
                "device inventory",
            )
            self.probed.update(zip(new, found))
            infos = {i: self.probed[i][0] for i in self.active}
            self._resolve_precision(list(infos.values()))
            by_type: dict[tuple, int] = {}
            for i, info in infos.items():
                by_type.setdefault((info.name, info.total_bytes, info.speed), i)
            cache = default_cache_dir()
            profiles = {}
            for key, i in by_type.items():
                if key not in self.profiles:  # measured (or cached) once per run
                    self.profiles[key] = self._profile(self.workers[i], infos[i], cache)
                profiles[key] = self.profiles[key]
            if self.spec.sharding != "none":
                self._carry_profiles(profiles, {k: infos[i] for k, i in by_type.items()})
        except RayTaskError as exc:
            raise LaunchError(f"probe failed: {cluster.cause(exc)}") from None
        probed = []
        for b, i in enumerate(self.active):
            info, ip, node_id = self.probed[i]
            profile = profiles[(info.name, info.total_bytes, info.speed)]
            if isinstance(profile, str):  # not even one sample fits: left out, saying why
                probed.append(
                    cluster.ProbedDevice(b, info, ip, node_id, None, no_fit=profile, index=i)
                )
            else:
                probed.append(cluster.ProbedDevice(b, info, ip, node_id, profile, index=i))
        return sorted(
            probed,
            key=lambda d: (d.node, d.node_id, d.info.index, d.bundle),
        )

    def _profile(self, worker: object, info: DeviceInfo, cache: str) -> ModelProfile | str:
        """The device's profile, or why not even one sample fits on it."""
        ref = worker.profile.remote(self.spec, self.precision, info, cache)
        try:
            return cluster.wait_all([ref], 600, f"profile of {info.name}")[0]
        except RayTaskError as exc:
            if isinstance(getattr(exc, "cause", None), NoFitError):
                return str(exc.cause)
            raise

    def _carry_profiles(self, profiles: dict, infos: dict) -> None:
        """Sharding may fit a model on a device where a replica does not fit one sample
        (nothing could be measured there): it gets the profile of the fastest device that
        was measured, carried over to its memory and speed (an estimate, noted)."""
        measured = [k for k, p in profiles.items() if not isinstance(p, str)]
        if not measured:
            return
        src = max(measured, key=lambda k: infos[k].speed)
        for key, why in [(k, p) for k, p in profiles.items() if isinstance(p, str)]:
            info = infos[key]
            profiles[key] = profiles[src].carried_to(
                info,
                headroom_fraction=self.spec.memory_headroom,
                time_scale=infos[src].speed / info.speed,
            )
            self.notes.append(
                f"{info.name}: a replica does not fit ({why}); its figures are {infos[src].name}'s "
                "measurements carried over to its memory and speed, for sharding"
            )

    def _resolve_precision(self, infos: list) -> None:
        """precision: auto becomes the precision every device supports, noted in the plan;
        chosen once: a resized job keeps it (its training run must not change)."""
        if self.precision is None:
            self.precision, self.precision_note = self.spec.precision, None
            if self.spec.precision == "auto":
                self.precision, why = choose_precision(infos)
                self.precision_note = f"precision {self.precision} (auto): {why}"
        if self.precision_note:
            self.notes.append(self.precision_note)

    def _train(self, plan: Plan, devices: list[cluster.ProbedDevice]) -> JobSummary:
        spec = self.spec
        if self.collector_factory is not None:
            self.collector = self.collector_factory()
        else:
            self.collector = SnapshotCollector.options(**cluster.on_this_node()).remote(
                self.metrics_host, spec.metrics_port or 0
            )
        self.listener(MetricsAt(ray.get(self.collector.url.remote())))
        ckpt_dir = spec.checkpoint_dir(self.runs_root)
        resume = _latest(ckpt_dir) if spec.checkpoint.resume else None
        if resume:
            self.listener(Resuming(resume))
        restarts, replans, attempt = 0, {}, 0
        t0 = time.monotonic()
        while True:
            try:
                if self._resize is not None:  # asked for before this attempt started
                    plan, devices = self._resized(ckpt_dir)
                    resume = _latest(ckpt_dir)
                outcomes = self._attempt(
                    plan, devices, ckpt_dir, resume, attempt, restarts, replans
                )
                if not outcomes[0].stopped:
                    break
                # Stopped at a step boundary for a resize: the next attempt resumes there,
                # the devices that stay keep their actors (the ranks left their group).
                self.workers.update(zip(self._ranked, self.actors))
                self.actors = []
                resume = _latest(ckpt_dir)
                attempt += 1
            except _AttemptFailed as failed:
                self._stop_workers()
                self._check_stop()
                decision = policy.decide(
                    failed.failures,
                    restarts=restarts,
                    max_restarts=spec.max_restarts,
                    plan=plan,
                    lost_devices=cluster.lost_devices(devices),
                    keep_all=spec.devices.keep_all,
                    min_count=spec.devices.min_count,
                )
                if decision.action == "fail":
                    raise LaunchError(f"job {spec.name}: {decision.reason}") from None
                restarts += 1
                if decision.replan == "device_lost":
                    self._lost(plan, decision.plan, ckpt_dir)
                plan = decision.plan
                if decision.replan:
                    replans[decision.replan] = replans.get(decision.replan, 0) + 1
                resume = _latest(ckpt_dir)
                attempt += 1
                self.listener(Restarting(decision, restarts, resume))
        seconds = time.monotonic() - t0
        steps = outcomes[0].steps_done
        summary = JobSummary(
            job=spec.name,
            steps=steps,
            seconds=seconds,
            samples_per_s=steps * spec.global_batch_size / seconds if seconds else 0.0,
            restarts=restarts,
            oom_events=sum(o.oom_events for o in outcomes) + replans.get("oom", 0),
            replans=replans,
            resizes=dict(self.resizes),
            checkpoint=outcomes[0].checkpoint,
            plan=Plan.from_json(outcomes[0].final_plan_json),
            parameters=outcomes[0].parameters,
            output=outcomes[0].output,
        )
        self.listener(Finished(summary))
        return summary

    def _resized(self, ckpt_dir: pathlib.Path) -> tuple[Plan, list[cluster.ProbedDevice]]:
        """Move to the requested devices: a new reservation, probe (from the profile cache
        for known device types) and plan; announced once the new ranks took a step."""
        req = self._take_resize()
        before = tuple(self.active)
        self._release([i for i in before if i not in req.devices])
        self.active = list(req.devices)
        plan, devices = self._probe_and_plan()
        self._count_resize(req, before, ckpt_dir)
        self.listener(Planned(plan, devices))
        return plan, devices

    def _lost(self, old: Plan, new: Plan, ckpt_dir: pathlib.Path) -> None:
        """Devices lost with their node: the job goes on without them (announced like a
        resize, once the ranks left took a step)."""
        before = tuple(self.active)
        kept = {int(r.device_id.removeprefix("b")) for r in new.ranks}
        self.active = [i for i in self.active if i in kept]
        self._release([i for i in before if i not in kept])
        gone = sorted({r.device_id for r in old.ranks} - {r.device_id for r in new.ranks})
        req = _ResizeRequest(
            tuple(self.active), "device_lost", f"device lost ({', '.join(gone)})", time.monotonic()
        )
        self._count_resize(req, before, ckpt_dir)

    def _count_resize(
        self, req: _ResizeRequest, before: tuple[int, ...], ckpt_dir: pathlib.Path
    ) -> None:
        """A resize for the ranks' metrics, announced once the new ranks took a step (from
        the checkpoint the next attempt resumes at)."""
        self.resizes[req.reason] = self.resizes.get(req.reason, 0) + 1
        self._announce = _Announce(req, before, checkpoint_step(latest_checkpoint(ckpt_dir)))

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
        self._ranked = [d.index for d in ranked]
        self.actors = [self._worker(i) for i in self._ranked]
        for i in list(self.workers):  # probed devices the plan left out
            ray.kill(self.workers.pop(i))
        addresses = self._collect([a.address.remote() for a in self.actors], "training actors")
        self._phase("start_workers")
        ip, port, _ = addresses[0]
        backend = "nccl" if all(d.info.is_cuda for d in ranked) else "gloo"
        world = len(ranked)
        master = f"tcp://{ip}:{port}"
        joins = [a.join.remote(master, r, world, backend, 120) for r, a in enumerate(self.actors)]
        self._collect(joins, "process group set-up")
        self._phase("process_group")
        ray.get(self.collector.begin_attempt.remote())
        if self._resize is not None:  # asked for while this attempt was starting
            self.collector.request_stop.remote()
        refs = []
        for rank, (actor, d) in enumerate(zip(self.actors, ranked)):
            ctx = RankContext(
                job=self.spec.name,
                spec=self.spec,
                precision=self.precision,
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
                resizes=dict(self.resizes),
                ranks_on_node=sum(other.node == d.node for other in ranked),
            )
            refs.append(actor.train.remote(ctx, self.collector))
        return self._wait(refs)

    def _worker(self, index: int):  # noqa: ANN202
        """The device's worker from the probe (or the attempt before a resize); a fresh one
        after a failure."""
        if index in self.workers:
            return self.workers.pop(index)
        return self._new_worker(index)

    def _new_worker(self, index: int):  # noqa: ANN202
        pg, bundle = self.bundles[index]
        request = self.all_requests[index]
        return DeviceWorker.options(**cluster.in_bundle(pg, bundle, request)).remote()

    def _collect(self, refs: list, what: str) -> list:
        try:
            return cluster.wait_all(refs, cluster.ACTOR_TIMEOUT_S, what)
        except (RayActorError, RayTaskError) as exc:
            raise _AttemptFailed(
                [RankFailure(-1, "lost", f"{what}: {cluster.cause(exc)}")]
            ) from None

    def _wait(self, refs: list) -> list[RankOutcome]:
        pending = list(refs)
        while pending:
            self._check_stop()
            done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            failures = [f for ref in done if (f := cluster.failure_of(refs, ref))]
            if failures:
                # The first failure is often a consequence (a peer's collective breaking):
                # give the other ranks a moment to fail too, and judge by the root cause.
                more, _ = ray.wait(pending, num_returns=len(pending), timeout=FAILURE_GRACE_S)
                failures += [f for ref in more if (f := cluster.failure_of(refs, ref))]
                self._progress()  # what the ranks reported last, the failing step included
                raise _AttemptFailed(failures)
            self._progress()
        return ray.get(refs)

    def _progress(self) -> None:
        if self.collector is None:
            return
        snaps: list[RankSnapshot] = ray.get(self.collector.latest.remote())
        if snaps and "first_step" not in self.phase_s:
            self._phase("first_step")
        if snaps:
            self.listener(Progress(snaps))
        if snaps and self._announce is not None:
            a, self._announce = self._announce, None
            seconds = time.monotonic() - a.request.at
            self.listener(
                Resized(a.request.reason, a.request.why, tuple(self.active), a.before, a.step,
                        seconds)
            )  # fmt: skip

    # -- clean-up -------------------------------------------------------------
    def _stop_workers(self) -> None:
        for a in [*self.actors, *self.workers.values()]:
            ray.kill(a, no_restart=True)
        self.actors, self.workers = [], {}

    def _cleanup(self) -> None:
        if ray.is_initialized():
            self._stop_workers()
            if self.collector is not None and self.collector_factory is None:
                ray.kill(self.collector)  # a factory's collector is its owner's to end
            self.collector = None
            for pg in [self.pg, *self.pgs.values()]:
                if pg is not None:
                    ray.util.remove_placement_group(pg)
            self.pg, self.pgs = None, {}
            if self.started_ray:
                ray.shutdown()


def _latest(ckpt_dir: pathlib.Path) -> str | None:
    found = latest_checkpoint(ckpt_dir)
    return str(found) if found else None


def check_devices(
    spec: JobSpec, devices: Sequence[int], requests: Sequence[object] | None = None
) -> None:
    """Raise LaunchError unless `devices` are distinct indices of the spec's devices, as
    many as the job may run on (all of them unless elastic: at least min_count)."""
    n = len(requests) if requests is not None else None
    bad = [i for i in devices if i < 0 or (n is not None and i >= n)]
    if bad or len(set(devices)) != len(devices) or not devices:
        allowed = f"0..{n - 1}" if n else "indices of the spec's devices"
        raise LaunchError(f"devices={list(devices)}: give distinct device indices in {allowed}")
    floor = spec.devices.min_count if spec.devices.elastic else n
    if floor is not None and len(devices) < floor:
        what = f"devices.min_count={floor}" if spec.devices.elastic else "the job is not elastic"
        raise LaunchError(f"devices={list(devices)}: {len(devices)} device(s), {what}")
