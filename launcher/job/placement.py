"""Where a job's ranks live: its reservations (placement groups, bundles) and its actors.

A gang job holds one placement group for all its devices (all or nothing). An elastic
job holds one per device, so that a resize keeps the devices that stay, with their
actors, and gives back those that go. Each device's actor (`DeviceWorker`) is started
once: it takes the inventory, probes, and then trains as a rank; a device left out of
the plan has its actor stopped, a failed attempt's actors are replaced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

from launcher.job import cluster
from launcher.job.worker import DeviceWorker


class Placement:
    def __init__(
        self,
        requests: Sequence[cluster.DeviceRequest],
        *,
        elastic: bool,
        env: dict[str, str] | None = None,
    ) -> None:
        self.requests = list(requests)  # every device of the spec, by index
        # The environment the ranks need beyond the node's (an object store's endpoint and
        # credentials, by their standard names); none keeps the pre-started workers.
        self.env = dict(env or {})
        self.elastic = elastic
        self._groups: dict[int, Any] = {}  # device index -> its placement group
        self._bundles: dict[int, tuple[Any, int]] = {}  # device index -> (group, bundle)
        self.idle: dict[int, Any] = {}  # device index -> an actor holding no rank
        self.ranks: list[Any] = []  # the actors of the attempt, in rank order
        self.rank_devices: list[int] = []  # the device index of each rank

    def reserve(self, devices: Sequence[int]) -> None:
        """Hold `devices`; an elastic job releases what it held beyond them."""
        if not self.elastic:
            pg = cluster.reserve([self.requests[i] for i in devices])
            self._groups = dict.fromkeys(devices, pg)
            self._bundles = {i: (pg, b) for b, i in enumerate(devices)}
            return
        self.release([i for i in self._groups if i not in devices])
        for i in devices:
            if i not in self._groups:
                self._groups[i] = cluster.reserve([self.requests[i]])
        self._bundles = {i: (self._groups[i], 0) for i in devices}

    def release(self, gone: Sequence[int]) -> None:
        """An elastic job's devices that left: their actors and reservations."""
        for i in gone:
            if i in self.idle:
                ray.kill(self.idle.pop(i), no_restart=True)
            if self.elastic and i in self._groups:
                ray.util.remove_placement_group(self._groups.pop(i))
            self._bundles.pop(i, None)

    def start_workers(self, devices: Sequence[int]) -> None:
        for i in devices:
            self.idle[i] = self._new_worker(i)

    def worker(self, index: int) -> Any:
        """The device's idle actor (from the probe, or the attempt before a resize)."""
        return self.idle[index]

    def assign_ranks(self, devices: Sequence[int]) -> list[Any]:
        """The actors of `devices` become the ranks, in that order (fresh ones where the
        last attempt's failed); the other idle actors (devices the plan left out) stop."""
        self.rank_devices = list(devices)
        self.ranks = [self.idle.pop(i) if i in self.idle else self._new_worker(i) for i in devices]
        for i in list(self.idle):
            ray.kill(self.idle.pop(i))
        return self.ranks

    def keep_ranks(self) -> None:
        """The ranks stopped at a step boundary (a resize): their actors stay, idle."""
        self.idle.update(zip(self.rank_devices, self.ranks))
        self.ranks = []

    def stop_workers(self) -> None:
        for a in [*self.ranks, *self.idle.values()]:
            ray.kill(a, no_restart=True)
        self.ranks, self.idle = [], {}

    def close(self) -> None:
        """Every actor and reservation of the job, gone."""
        self.stop_workers()
        for pg in {id(g): g for g in self._groups.values()}.values():
            ray.util.remove_placement_group(pg)
        self._groups, self._bundles = {}, {}

    def _new_worker(self, index: int) -> Any:
        pg, bundle = self._bundles[index]
        options = cluster.in_bundle(pg, bundle, self.requests[index])
        if self.env:
            options["runtime_env"] = {"env_vars": self.env}
        return DeviceWorker.options(**options).remote()
