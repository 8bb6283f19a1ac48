"""The Ray side of a job: connect, reserve one bundle per device, place actors, wait for them.

The actors themselves are in `worker` (one per bundle) and `collector`. Each
start-up phase is its own function with a timeout; on failure it raises
`LaunchError` naming what to check, and the runner cleans up what was created.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from autobatch.errors import LaunchError
from autobatch.probe.devices import DeviceInfo, SimulatedDevice
from autobatch.probe.profile import ModelProfile
from launcher.job import policy
from launcher.job.policy import RankFailure
from launcher.job.spec import JobSpec
from launcher.job.worker import DeviceWorker

RESERVE_TIMEOUT_S = 60.0
ACTOR_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class DeviceRequest:
    """One bundle: a simulated device (on any CPU) or one GPU."""

    simulated: SimulatedDevice | None
    resources: dict[str, float]


@dataclass(frozen=True)
class ProbedDevice:
    bundle: int
    info: DeviceInfo
    node: str  # node IP
    node_id: str
    profile: ModelProfile | None  # None: not even one sample fits, see no_fit
    no_fit: str | None = None
    index: int | None = None  # in the spec's devices (default: the bundle's)

    @property
    def device_id(self) -> str:
        """Stable across resizes: the device's place in the spec's device list."""
        return f"b{self.bundle if self.index is None else self.index}"


# ---------------------------------------------------------------------------
# phase 1: connect


def connect(address: str | None, *, num_cpus: int | None = None) -> bool:
    """Connect to `address` (or RAY_ADDRESS); start an embedded local Ray when neither is
    given. Returns True when this call started Ray (and so must shut it down)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    env = {
        "PYTHONPATH": os.pathsep.join(
            p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p
        )
    }
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
            return False
        ray.init(
            address="local",  # a new instance, even where another (`ray start`) runs here
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=200 * 2**20,
            # No runtime_env: a local Ray puts the driver's directory on its workers' path
            # already, and a runtime_env keeps actors off the pre-started workers (~3 s).
        )
        return True
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "a new local Ray"
        raise LaunchError(
            f"cannot connect to the Ray cluster at {where}: {exc}; check that "
            "it runs (`ray status`) and the address, and that RAY_AUTH_MODE and the token "
            "(~/.ray/auth_token) are the cluster's (Ray turns token authentication on for a "
            "local head by default)"
        ) from None


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast (Ray itself retries for minutes) when a host:port address does not answer."""
    import re
    import socket

    m = re.fullmatch(r"(?:ray://)?\[?([\w.:-]+?)\]?:(\d+)", address)
    if m is None:
        return  # "auto" and other forms: leave them to Ray
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout_s).close()
    except OSError as exc:
        raise LaunchError(
            f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}; check the "
            "address (--address or RAY_ADDRESS) and that the head node runs (`ray status`)"
        ) from None


# ---------------------------------------------------------------------------
# phase 2: which devices, and reserving them


def device_requests(spec: JobSpec) -> list[DeviceRequest]:
    sel = spec.devices
    if sel.select == "simulated":
        out = []
        for s in sel.simulated:
            for d in s.devices():
                out.append(DeviceRequest(d, {"CPU": 1.0}))
        return out
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus == 0:
        raise LaunchError(
            "no devices: the Ray cluster has no GPU (`ray status`); to run on CPUs, list "
            "simulated devices in the job spec (devices: {select: simulated, simulated: [...]})"
        )
    n = gpus if sel.select != "count" else sel.count
    if n > gpus:
        raise LaunchError(f"devices.count={n} but the cluster has {gpus} GPU(s)")
    return [DeviceRequest(None, {"GPU": 1.0, "CPU": 1.0}) for _ in range(n)]


def reserve(
    requests: Sequence[DeviceRequest], timeout_s: float = RESERVE_TIMEOUT_S
) -> PlacementGroup:
    pg = placement_group([r.resources for r in requests], strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        want = sum_resources(requests)
        raise LaunchError(
            f"could not reserve {len(requests)} device bundle(s) ({want}) within {timeout_s:.0f} "
            f"s; the cluster has {ray.available_resources()} free: check `ray status`"
        )
    return pg


def sum_resources(requests: Sequence[DeviceRequest]) -> dict[str, float]:
    total: dict[str, float] = {}
    for r in requests:
        for k, v in r.resources.items():
            total[k] = total.get(k, 0) + v
    return total


def on_this_node() -> dict[str, Any]:
    """Actor options that keep it on the driver's node: an actor the driver depends on (the
    metrics collector) must not die with a training node."""
    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)}


def in_bundle(pg: PlacementGroup, bundle: int, request: DeviceRequest) -> dict[str, Any]:
    """Actor options that place it in `bundle` with the bundle's resources."""
    return {
        "num_cpus": request.resources.get("CPU", 0),
        "num_gpus": request.resources.get("GPU", 0),
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=bundle
        ),
    }


def wait_all(refs: list, timeout_s: float, what: str) -> list:
    """ray.get with a deadline and an error that names which ranks did not answer."""
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        missing = [i for i, r in enumerate(refs) if r in pending]
        raise LaunchError(
            f"{what}: no answer from bundle(s) {missing} within {timeout_s:.0f} s;"
            " check `ray status` and the worker logs"
        )
    return ray.get(refs)


def list_devices(spec: JobSpec | None) -> list[dict[str, Any]]:
    """Every device of every alive node (one short-lived actor per node), then the job's
    simulated devices."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    actors = [
        DeviceWorker.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote()
        for n in nodes
    ]
    try:
        found = wait_all([a.node_devices.remote() for a in actors], ACTOR_TIMEOUT_S, "inventory")
    finally:
        for a in actors:
            ray.kill(a)
    rows = []
    for ip, infos in found:
        for d in infos:
            kind = "gpu" if d.is_cuda else "gpu (not visible)" if d.torch_device is None else "cpu"
            rows.append(
                {
                    "node": ip,
                    "name": d.name,
                    "total_bytes": d.total_bytes,
                    "kind": kind,
                    "uuid": d.uuid,
                }
            )
    for i, d in enumerate(spec.devices.simulated_devices() if spec else []):
        rows.append(
            {
                "node": "(any)",
                "name": d.name,
                "total_bytes": d.memory_bytes,
                "kind": f"simulated, speed {d.speed:g}",
                "uuid": d.info(i).uuid,
            }
        )
    return rows


# ---------------------------------------------------------------------------
# what went wrong on a rank


def cause(exc: BaseException) -> str:
    """One line for a Ray error: the rank's own exception (type and first line), if any."""
    own = getattr(exc, "cause", None)
    if own is not None:
        return f"{type(own).__name__}: {str(own).splitlines()[0] if str(own) else ''}"
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def failure_of(refs: list, ref: object) -> RankFailure | None:
    """What went wrong on the rank of a finished `ref`, or None when it succeeded."""
    rank = refs.index(ref)
    try:
        ray.get(ref)
    except RayActorError as exc:
        return RankFailure(rank, "lost", f"rank {rank} worker died: {cause(exc)}")
    except RayTaskError as exc:
        kind = policy.classify(getattr(exc, "cause", None))
        return RankFailure(rank, kind, f"rank {rank}: {cause(exc)}")
    return None


def lost_devices(devices: list[ProbedDevice]) -> set[str]:
    """The job's devices whose node is gone."""
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    return {d.device_id for d in devices if d.node_id not in alive}
