"""One job's controller: an explicit state machine over reserve, probe, plan, start, train.

The states and their order are in `launcher.job.states`. `_enter` is the one place a
state is entered: it times the phase left, tells the listener (`StateChanged`, and the
runner events tied to the transition: `Planned`, `Restarting`, `Finished`) and keeps the
state. Each state's handler does its phase and returns the next state with a reason;
the failure policy's decisions are transitions (Training -> Restarting or Failed).

Placement (placement groups, bundles, actors) is `launcher.job.placement`; probing and
planning is `launcher.job.probing`. A cancel (`stop`) is heard within about a second in
every state, probing included: waits poll it, and the job's actors are killed on the way
out. Every actor and reservation is removed on the way out, whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import ray

from autobatch.planning.plan import Plan
from autobatch.probe.devices import normalise_speeds
from autobatch.step.storage import STORAGE_ENV, is_uri
from launcher.errors import JobCancelled, LaunchError
from launcher.job import cluster, events, policy, ranks
from launcher.job.checkpoint import checkpoint_step, latest_checkpoint
from launcher.job.collector import SnapshotCollector
from launcher.job.context import RankContext, RunTally
from launcher.job.events import (
    Finished,
    JobSummary,
    Listener,
    MetricsAt,
    Planned,
    Progress,
    Resuming,
    StateChanged,
)
from launcher.job.events import Restarting as RestartingEvent
from launcher.job.placement import Placement
from launcher.job.policy import RankFailure
from launcher.job.probing import Prober, plan_job
from launcher.job.ranks import AttemptFailed, wait_refs
from launcher.job.resizes import Resizes, check_devices
from launcher.job.spec import JobSpec
from launcher.job.states import (
    TERMINAL,
    Cancelled,
    Connecting,
    Failed,
    JobState,
    Planning,
    Probing,
    Reserving,
    Resizing,
    Restarting,
    Starting,
    Succeeded,
    Training,
    state_name,
)

START_UP = ("connecting", "reserving", "probing", "planning", "starting")


class JobController:
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
        restarts_before: int = 0,
    ) -> None:
        """`stop`: set it to cancel the job (heard within about a second in every state;
        raises JobCancelled). `collector_factory`: makes the Ray actor the ranks push
        snapshots to, which its caller ends (default: a SnapshotCollector serving its own
        /metrics, ended with the run). `devices`: the spec's devices (indices into its
        device list) an elastic job starts on; default all of them. `restarts_before`: the
        job's restarts so far (a re-queued job's), counted on in events and metrics."""
        self.spec, self.address, self.runs_root = spec, address, runs_root
        self.listener: Listener = listener or (lambda event: None)
        self.metrics_host, self.stop, self.collector_factory = metrics_host, stop, collector_factory
        self.active: list[int] | None = list(devices) if devices is not None else None
        self.state: JobState = Connecting()
        self.phase_s: dict[str, float] = {}  # seconds in each start-up state, first time
        self.ckpt_dir = spec.checkpoint_dir(runs_root)
        self.placement: Placement | None = None
        self.prober: Prober | None = None
        self.collector = None
        self.tally = RunTally(before=restarts_before)
        self.resizes = Resizes()
        self.rebalanced: set[tuple] = set()  # the rebalances told to the listener
        self._entered = time.monotonic()
        self._t_train: float | None = None

    # -- public entry points ------------------------------------------------
    def run(self) -> JobSummary:
        with self._session():
            self._create_collector()  # its process starts while the devices are probed
            state = self._run_until(TERMINAL)
        if isinstance(state, Failed):
            raise LaunchError(state.reason)
        return state.summary

    def probe_and_plan(self) -> tuple[Plan, list[cluster.ProbedDevice]]:
        """Reserve, probe and plan, then release everything (`autobatch plan`)."""
        with self._session():
            state = self._run_until((Starting,))
        return state.plan, list(state.probed)

    def request_resize(self, devices: Sequence[int], reason: str, why: str) -> None:
        """Move the job to `devices` (indices into the spec's devices) at the next step
        boundary; thread-safe. `reason`: grew or shrank, `why`: for the user."""
        if not self.spec.devices.elastic:
            raise LaunchError(f"job {self.spec.name} is not elastic (devices.min_count unset)")
        devices = tuple(sorted(set(devices)))
        check_devices(self.spec, devices, self.placement and self.placement.requests)
        self.resizes.request(devices, reason, why)
        collector = self.collector
        if collector is not None:
            collector.request_stop.remote()

    # -- the machine ----------------------------------------------------------
    def _run_until(self, until: tuple[type, ...]) -> JobState:
        state: JobState = self.state
        try:
            state = self._enter(Reserving(tuple(self._devices())), "connected to Ray")
            while not isinstance(state, until):
                self._check_stop()
                state = self._enter(*self._next(state))
        except JobCancelled as exc:
            self._enter(Cancelled(str(exc)), str(exc))
            raise
        except LaunchError as exc:
            self._enter(Failed(str(exc)), str(exc))
            raise
        return state

    def _next(self, state: JobState) -> tuple[JobState, str]:
        match state:
            case Reserving(devices=devices):
                self.placement.reserve(devices)
                return Probing(devices), f"{len(devices)} device(s) reserved"
            case Probing(devices=devices):
                probed = tuple(self.prober.probe(devices))
                return Planning(probed), f"{len(probed)} device(s) probed"
            case Planning(probed=probed):
                return self._planned(probed)
            case Starting():
                return self._start(state)
            case Training():
                return self._train(state)
            case Resizing():
                return self._resized(state)
            case Restarting(decision=decision, probed=probed, resume=resume):
                if decision.replan == "device_lost":
                    self._lost(state.before, decision.plan)
                return Starting(decision.plan, probed, resume), f"attempt {self.tally.attempts}"
        raise AssertionError(f"no handler for {state!r}")

    def _planned(self, probed: tuple) -> tuple[JobState, str]:
        plan = plan_job(self.spec, probed, self.prober.notes)
        why = (
            f"plan of {plan.world_size} rank(s), predicted "
            f"{plan.predicted_samples_per_s:,.1f} samples/s"
        )
        return Starting(plan, probed, self._resume_point()), why

    def _enter(self, state: JobState, reason: str) -> JobState:
        """The one place a state is entered: phase timed, listener told, state kept."""
        now = time.monotonic()
        left, name = state_name(self.state), state_name(state)
        if left in START_UP:
            self.phase_s.setdefault(left, now - self._entered)
        before, self.state, self._entered = self.state, state, now
        self.listener(StateChanged(name, reason, left))
        match state:
            case Starting(plan=plan, probed=probed) if isinstance(before, (Planning, Resizing)):
                self.listener(Planned(plan, probed))
            case Restarting(decision=decision, resume=resume):
                self.listener(RestartingEvent(decision, self.tally.total, resume))
            case Succeeded(summary=summary):
                self.listener(Finished(summary))
        return state

    # -- phases -------------------------------------------------------------
    @contextlib.contextmanager
    def _session(self) -> Iterator[None]:
        """Connected to Ray while inside; every actor and bundle removed on the way out."""
        n = sum(s.count for s in self.spec.devices.simulated)
        self._entered = time.monotonic()
        started = False
        try:
            started = cluster.connect(self.address, num_cpus=max(4, n + 2))
            yield
        finally:
            self._cleanup(started)

    def _devices(self) -> list[int]:
        """The spec's devices this run starts on (all unless given), checked."""
        if self.placement is None:
            requests = cluster.device_requests(self.spec)
            if any(r.simulated for r in requests):  # speeds relative to all of the spec's
                sims = normalise_speeds([r.simulated for r in requests])
                requests = [replace(r, simulated=s) for r, s in zip(requests, sims)]
            if self.active is None:
                self.active = list(range(len(requests)))
            check_devices(self.spec, self.active, requests)
            self.placement = Placement(
                requests, elastic=self.spec.devices.elastic, env=self._storage_env()
            )
            self.prober = Prober(
                self.spec, self.placement, lambda r, t, w: wait_refs(r, t, w, self._check_stop)
            )
        return list(self.active)

    def _resume_point(self) -> str | None:
        """The checkpoint the first attempt resumes from (the spec's choice); later attempts
        always resume from the latest."""
        if self.tally.attempts:
            return _latest(self.ckpt_dir)
        return _latest(self.ckpt_dir) if self.spec.checkpoint.resume else None

    def _start(self, state: Starting) -> tuple[JobState, str]:
        if self.resizes.pending:  # asked for before this attempt started
            return self.resizes.take(self.active), "resize requested"
        self._start_collector(state.resume)
        attempt = self.tally.attempts
        self.tally.attempts += 1
        by_id = {d.device_id: d for d in state.probed}
        ranked = [by_id[r.device_id] for r in state.plan.ranks]

        def context(rank: int, d: cluster.ProbedDevice) -> RankContext:
            return self._context(state, rank, d, ranked, attempt)

        try:
            refs = ranks.launch(self.placement, ranked, self.collector, context, self._check_stop)
            if self.resizes.pending:  # asked for while this attempt was starting
                self.collector.request_stop.remote()
        except AttemptFailed as failed:
            return self._decide(failed.failures, state.plan, state.probed)
        return Training(state.plan, state.probed, tuple(refs)), f"{len(refs)} rank(s) started"

    def _create_collector(self) -> None:
        if self.collector is not None:
            return
        if self.collector_factory is not None:
            self.collector = self.collector_factory()
        else:
            self.collector = SnapshotCollector.options(**cluster.on_this_node()).remote(
                self.metrics_host, self.spec.metrics_port or 0
            )

    def _start_collector(self, resume: str | None) -> None:
        if self._t_train is not None:  # announced by the first attempt
            return
        self._create_collector()
        self.listener(MetricsAt(ray.get(self.collector.url.remote())))
        if resume:
            self.listener(Resuming(resume))
        self._t_train = time.monotonic()

    def _context(
        self, state: Starting, rank: int, d: cluster.ProbedDevice, ranked: list, attempt: int
    ) -> RankContext:
        return RankContext(
            job=self.spec.name,
            spec=self.spec,
            precision=self.prober.precision,
            plan_json=state.plan.to_json(),
            rank=rank,
            device=d.info,
            node=d.node,
            checkpoint_dir=str(self.ckpt_dir),
            output_dir=str(self.spec.output_path(self.runs_root)),
            resume_from=state.resume,
            attempt=attempt,
            run=self.tally.run,
            speed=d.info.speed,
            backward_factor=d.profile.backward_factor,
            restarts=self.tally.total,
            replans=dict(self.tally.replans),
            resizes=dict(self.resizes.counts),
            ranks_on_node=sum(other.node == d.node for other in ranked),
        )

    def _train(self, state: Training) -> tuple[JobState, str]:
        try:
            outcomes = ranks.wait_ranks(list(state.refs), self._check_stop, self._progress)
        except AttemptFailed as failed:
            return self._decide(failed.failures, state.plan, state.probed)
        if outcomes[0].stopped:  # at a step boundary for a resize: the actors stay
            self.placement.keep_ranks()
            return self.resizes.take(self.active), f"stopped at step {outcomes[0].steps_done}"
        summary = JobSummary.of(
            self.spec.name,
            outcomes,
            seconds=time.monotonic() - (self._t_train or time.monotonic()),
            global_batch_size=self.spec.global_batch_size,
            restarts=self.tally.total,
            replans=self.tally.replans,
            resizes=self.resizes.counts,
        )
        return Succeeded(summary), f"{summary.steps} steps in {summary.seconds:.1f} s"

    def _decide(
        self, failures: list[RankFailure], plan: Plan, probed: Sequence[cluster.ProbedDevice]
    ) -> tuple[JobState, str]:
        """The failure policy's decision, as the next state."""
        self.placement.stop_workers()
        self._check_stop()
        decision = policy.decide(
            failures,
            restarts=self.tally.restarts,
            max_restarts=self.spec.max_restarts,
            plan=plan,
            lost_devices=cluster.lost_devices(list(probed)),
            keep_all=self.spec.devices.keep_all,
            min_count=self.spec.devices.min_count,
        )
        if decision.action == "fail":
            return Failed(f"job {self.spec.name}: {decision.reason}"), decision.reason
        self.tally.restarts += 1
        if decision.replan:
            self.tally.replans[decision.replan] = self.tally.replans.get(decision.replan, 0) + 1
        resume = _latest(self.ckpt_dir)
        why = f"restart {self.tally.total}: {decision.reason}"
        return Restarting(decision, tuple(probed), resume, plan), why

    def _resized(self, state: Resizing) -> tuple[JobState, str]:
        """Move to the requested devices: reserve, probe (the profile cache answers for
        known device types) and plan them; announced once the new ranks took a step."""
        before = tuple(self.active)
        gone = [i for i in before if i not in state.devices]
        self.placement.release(gone)
        self.prober.forget(gone)
        self.active = list(state.devices)
        self.resizes.count(state, before, self._checkpoint_step())
        self.placement.reserve(state.devices)
        return self._planned(tuple(self.prober.probe(state.devices)))

    def _lost(self, old: Plan, new: Plan) -> None:
        """Devices lost with their node: the job goes on without them (announced like a
        resize, once the ranks left took a step)."""
        before = tuple(self.active)
        kept = {int(r.device_id.removeprefix("b")) for r in new.ranks}
        self.active = [i for i in self.active if i in kept]
        gone = [i for i in before if i not in kept]
        self.placement.release(gone)
        self.prober.forget(gone)
        lost = sorted({r.device_id for r in old.ranks} - {r.device_id for r in new.ranks})
        why = f"device lost ({', '.join(lost)})"
        lost_state = Resizing(tuple(self.active), "device_lost", why, time.monotonic())
        self.resizes.count(lost_state, before, self._checkpoint_step())

    def _storage_env(self) -> dict[str, str]:
        return _storage_env_of(self.ckpt_dir, self.spec.output_path(self.runs_root))

    def _checkpoint_step(self) -> int:
        return checkpoint_step(latest_checkpoint(self.ckpt_dir))

    # -- waiting ------------------------------------------------------------
    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise JobCancelled(f"job {self.spec.name} was cancelled")

    def _progress(self) -> None:
        if self.collector is None:
            return
        snaps = ray.get(self.collector.latest.remote())
        if not snaps:
            return
        self.phase_s.setdefault("first_step", time.monotonic() - self._entered)
        rebalanced = events.rebalances_in(snaps, self.rebalanced)
        for event in (Progress(snaps), *rebalanced, self.resizes.announcement(self.active)):
            if event is not None:
                self.listener(event)

    # -- clean-up -------------------------------------------------------------
    def _cleanup(self, started_ray: bool) -> None:
        if not ray.is_initialized():
            return
        if self.placement is not None:
            self.placement.close()
        if self.collector is not None and self.collector_factory is None:
            ray.kill(self.collector)  # a factory's collector is its owner's to end
        self.collector = None
        if started_ray:
            ray.shutdown()


def _storage_env_of(ckpt_dir: object, output_dir: object) -> dict[str, str]:
    """The standard object-store variables of this process's environment (names only from
    autobatch.step.storage.STORAGE_ENV; values never logged), for ranks that write to an
    object store: a rank on another node has its own environment."""
    if not (is_uri(ckpt_dir) or is_uri(output_dir)):
        return {}
    return {k: os.environ[k] for k in STORAGE_ENV if k in os.environ}


def _latest(ckpt_dir: object) -> str | None:
    found = latest_checkpoint(ckpt_dir)
    return str(found) if found else None
