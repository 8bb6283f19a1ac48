"""What a job's devices can do: inventory, precision, one profile per device type, and the
plan made from them.

Each device's actor takes its inventory; one device of each type not seen yet in this
run is measured (one at a time, so timings are not disturbed; the profile cache answers
for types measured before), the others share its profile. Under sharding, a device a
replica does not fit gets the fastest measured device's profile carried over to its
memory and speed (an estimate, noted in the plan); where no device holds a replica, the
fastest device's host CPU measures one in its place. `precision: auto` is chosen once
per run: a resized job keeps it, its training run must not change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from ray.exceptions import RayTaskError

from autobatch.errors import LaunchError, NoFitError
from autobatch.planning.plan import ExcludedDevice, Plan
from autobatch.planning.planner import equal_split_plan, make_plan
from autobatch.probe.cache import default_cache_dir
from autobatch.probe.devices import DeviceInfo
from autobatch.probe.estimate import GPU_OVERHEAD_BYTES
from autobatch.probe.profile import ModelProfile
from autobatch.step.precision import Precision, choose_precision
from launcher.job import cluster
from launcher.job.bounds import check_plan
from launcher.job.placement import Placement
from launcher.job.spec import JobSpec

PROFILE_TIMEOUT_S = 600.0

Waiter = Callable[[list, float, str], list]
"""(refs, timeout_s, what) -> their values: the controller's wait, which hears a cancel."""


class Prober:
    def __init__(self, spec: JobSpec, placement: Placement, wait: Waiter) -> None:
        self.spec, self.placement, self.wait = spec, placement, wait
        self.found: dict[int, tuple] = {}  # device index -> (DeviceInfo, node ip, node id)
        self.profiles: dict[tuple, ModelProfile | str] = {}  # by device type, this run's
        self.precision: Precision | None = None  # the spec's, with auto resolved
        self.precision_note: str | None = None
        self.notes: list[str] = []  # choices made on the way, carried into the plan

    def forget(self, gone: Sequence[int]) -> None:
        for i in gone:
            self.found.pop(i, None)

    def probe(self, devices: Sequence[int]) -> list[cluster.ProbedDevice]:
        """The devices' inventory and profiles, sorted by node (the ranks' order)."""
        self.notes = []
        new = [i for i in devices if i not in self.found]
        self.placement.start_workers(new)
        requests = self.placement.requests
        try:
            workers = [self.placement.worker(i) for i in new]
            refs = [w.inventory.remote(requests[i].simulated, i) for w, i in zip(workers, new)]
            found = self.wait(refs, cluster.ACTOR_TIMEOUT_S, "device inventory")
            self.found.update(zip(new, found))
            infos = {i: self.found[i][0] for i in devices}
            self._resolve_precision(list(infos.values()))
            profiles = self._profiles(infos)
        except RayTaskError as exc:
            raise LaunchError(f"probe failed: {cluster.cause(exc)}") from None
        probed = []
        for b, i in enumerate(devices):
            info, ip, node_id = self.found[i]
            profile = profiles[_type_of(info)]
            no_fit = profile if isinstance(profile, str) else None  # left out, saying why
            probed.append(
                cluster.ProbedDevice(
                    b, info, ip, node_id, None if no_fit else profile, no_fit=no_fit, index=i
                )
            )
        return sorted(probed, key=lambda d: (d.node, d.node_id, d.info.index, d.bundle))

    def _profiles(self, infos: dict[int, DeviceInfo]) -> dict[tuple, ModelProfile | str]:
        by_type: dict[tuple, int] = {}
        for i, info in infos.items():
            by_type.setdefault(_type_of(info), i)
        cache = default_cache_dir()
        new = {key: i for key, i in by_type.items() if key not in self.profiles}
        self.profiles.update(self._cached(new, infos, cache))  # looked up side by side
        for key, i in new.items():
            if self.profiles.get(key) is None:  # measured one at a time: timings undisturbed
                self.profiles[key] = self._profile(self.placement.worker(i), infos[i], cache)
        profiles = {key: self.profiles[key] for key in by_type}
        if self.spec.sharding != "none":
            self._carry_profiles(profiles, by_type, infos, cache)
        return profiles

    def _cached(self, new: dict[tuple, int], infos: dict, cache: str) -> dict:
        """The profiles the cache holds for these device types (None where it holds none)."""
        refs = {
            key: self.placement.worker(i).profile.remote(
                self.spec, self.precision, infos[i], cache, measure=False
            )
            for key, i in new.items()
        }
        return {key: self._answer(ref, infos[new[key]]) for key, ref in refs.items()}

    def _profile(self, worker: Any, info: DeviceInfo, cache: str) -> ModelProfile | str:
        return self._answer(worker.profile.remote(self.spec, self.precision, info, cache), info)

    def _answer(self, ref: Any, info: DeviceInfo) -> ModelProfile | str | None:
        """A profile call's answer, or why not even one sample fits on the device."""
        try:
            return self.wait([ref], PROFILE_TIMEOUT_S, f"profile of {info.name}")[0]
        except RayTaskError as exc:
            if isinstance(getattr(exc, "cause", None), NoFitError):
                return str(exc.cause)
            raise

    def _carry_profiles(self, profiles: dict, by_type: dict, infos: dict, cache: str) -> None:
        """Sharding may fit a model on a device where a replica does not fit one sample
        (nothing could be measured there): it gets the profile of the fastest device that
        was measured, carried over to its memory and speed (an estimate, noted). Where no
        device holds a replica, the fastest device's host measures it (`host_stand_in`)."""
        unfit = {k: p for k, p in profiles.items() if isinstance(p, str)}
        if not unfit:
            return
        speed = {k: infos[by_type[k]].speed for k in profiles}
        measured = [k for k in profiles if k not in unfit]
        src = max(measured or profiles, key=speed.get)
        source = profiles[src] if measured else self._host_profile(by_type[src], infos, cache)
        if isinstance(source, str):
            return  # not even the host holds a replica: every device says why it cannot
        whose = f"{infos[by_type[src]].name}'s" if measured else "the host CPU's"
        for key, why in unfit.items():
            info = infos[by_type[key]]
            # a CPU's tensors leave out the CUDA context, workspaces and fragmentation, and
            # its optimizer steps tensor by tensor where a GPU's foreach AdamW copies them all
            on_gpu = info.is_cuda and not measured
            extra = (("gpu_overhead", GPU_OVERHEAD_BYTES),) if on_gpu else ()
            profiles[key] = source.carried_to(
                info,
                headroom_fraction=self.spec.memory_headroom,
                time_scale=speed[src] / info.speed,
                extra_reserve=extra,
                extra_optimizer_bytes=source.state.grads_bytes if on_gpu and source.state else 0,
            )
            self.notes.append(
                f"{info.name}: a replica does not fit ({why}); its figures are {whose} "
                "measurements carried over to its memory and speed, for sharding"
            )

    def _host_profile(self, i: int, infos: dict, cache: str) -> ModelProfile | str:
        worker, info = self.placement.worker(i), infos[i]
        return self._answer(
            worker.host_profile.remote(self.spec, self.precision, info, cache), info
        )

    def _resolve_precision(self, infos: list[DeviceInfo]) -> None:
        if self.precision is None:
            self.precision, self.precision_note = self.spec.precision, None
            if self.spec.precision == "auto":
                self.precision, why = choose_precision(infos)
                self.precision_note = f"precision {self.precision} (auto): {why}"
        if self.precision_note:
            self.notes.append(self.precision_note)


def plan_job(spec: JobSpec, probed: Sequence[cluster.ProbedDevice], notes: Sequence[str]) -> Plan:
    """The plan on the probed devices (those that fit), for the spec's global batch."""
    fit = [d for d in probed if d.profile is not None]
    unfit = [ExcludedDevice(d.device_id, d.info.name, d.no_fit) for d in probed if d.no_fit]
    if not fit or (unfit and spec.devices.keep_all):
        why = "no device can" if not fit else "devices.keep_all is set, but not every device can"
        reasons = "; ".join(f"{e.device_id}: {e.reason}" for e in unfit)
        raise LaunchError(f"{why} train this job: {reasons}")
    capacities = [d.profile.capacity(d.device_id, d.info.name) for d in fit]
    if spec.planner == "equal_split":
        plan = equal_split_plan(spec.global_batch_size, capacities)
    else:
        plan = make_plan(
            spec.global_batch_size, capacities, sharding=spec.sharding,
            keep_all=spec.devices.keep_all,
        )  # fmt: skip
    if plan.sharding == "proportional" and fit[0].profile.precision == "fp16":
        raise LaunchError(
            "sharding: auto found only proportional fits these devices, and proportional "
            "cannot train in fp16 (its loss scaler would check one rank's slice of the "
            "gradients): set precision: fp32 (or bf16 where every GPU has it), or add devices"
        )
    checkpointed = sorted({d.info.name for d in fit if d.profile.gradient_checkpointing})
    why = "micro-batch 1 does not fit without it"
    notes = [*notes, *(f"gradient checkpointing on {n}: {why}" for n in checkpointed)]
    plan = replace(plan, excluded=(*plan.excluded, *unfit), notes=(*plan.notes, *notes))
    check_plan(spec, plan)  # its size, and on simulated devices a step's input
    return plan


def _type_of(info: DeviceInfo) -> tuple:
    return (info.name, info.total_bytes, info.speed)
