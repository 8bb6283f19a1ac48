"""Scheduling over device slots: which queued jobs start, which elastic jobs grow or shrink.

A slot is one device. A simulated device named `sim-a100` with `count: 2` is
the slots `sim:sim-a100#0` and `sim:sim-a100#1`: two jobs naming the same
simulated device wait for each other, jobs on disjoint names run side by side.
GPUs are the slots `gpu#0 .. gpu#N-1` (N: the cluster's GPUs); a job asking for
`count: k` takes any k free ones, `all` (and `name`, which the runner reserves as
every GPU) takes them all.

`schedule` is a pure function: the queue, the running jobs and the GPU count in,
the moves out.

- Queued jobs go by priority (higher first), then in order. A job starts when all
  its devices are free (gang), an elastic one (`devices.min_count`) when at least
  `min_count` are: it takes every one of its devices that is free.
- A job that cannot start does not block a later one whose devices are free, but
  holds what it asks for, so later jobs cannot overtake it for ever (no head-of-line
  blocking unless `strict_order`).
- The first job that cannot start (the head) may shrink running elastic jobs of
  the same or a lower priority, lowest first, never below their `min_count`: only
  when that lets it start, and counting what resizes under way already release.
- Then running elastic jobs grow into the free devices they can use that no
  waiting job holds.

Jobs that can never fit are reported (`unsatisfiable`), not left to wait.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from launcher.job.spec import JobSpec


@dataclass(frozen=True)
class Need:
    """What a job needs: named slots (slot k is the spec's device k), or interchangeable
    GPUs; an elastic job at least `min_count` of them."""

    named: tuple[str, ...] = ()
    gpus: int = 0
    all_gpus: bool = False
    min_count: int | None = None
    priority: int = 0

    def wanted(self, total_gpus: int) -> int:
        """Devices at full size."""
        return len(self.named) + (total_gpus if self.all_gpus else self.gpus)

    def floor(self, total_gpus: int) -> int:
        """The fewest devices it may run on."""
        return self.min_count if self.min_count is not None else self.wanted(total_gpus)

    def devices(self, slots: frozenset[str]) -> list[int]:
        """The spec's device indices of `slots` (the runner's `devices`)."""
        if self.named:
            return [i for i, s in enumerate(self.named) if s in slots]
        return list(range(len(slots)))

    def slots_of(self, devices: Sequence[int], held: frozenset[str]) -> frozenset[str]:
        """The slots of the spec's `devices`; for GPUs, that many of the slots `held`."""
        if self.named:
            return frozenset(self.named[i] for i in devices)
        return frozenset(sorted(held, key=_gpu_index)[: len(devices)])


@dataclass(frozen=True)
class Running:
    """A job holding `slots`; `resizing`: a resize is under way, releasing `releasing`."""

    job_id: str
    need: Need
    slots: frozenset[str]
    resizing: bool = False
    releasing: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Resize:
    job_id: str
    slots: frozenset[str]  # what the job holds once resized
    reason: Literal["grew", "shrank"]
    why: str


@dataclass(frozen=True)
class Moves:
    starts: list[tuple[str, frozenset[str]]] = field(default_factory=list)
    resizes: list[Resize] = field(default_factory=list)


def need(spec: JobSpec) -> Need:
    sel = spec.devices
    elastic = {"min_count": sel.min_count, "priority": spec.priority}
    if sel.select == "simulated":
        seen: dict[str, int] = {}
        named = []
        for s in sel.simulated:
            for _ in range(s.count):
                named.append(f"sim:{s.name}#{seen.get(s.name, 0)}")
                seen[s.name] = seen.get(s.name, 0) + 1
        return Need(tuple(named), **elastic)
    if sel.select == "count":
        return Need(gpus=int(sel.count or 0), **elastic)
    return Need(all_gpus=True, **elastic)


def unsatisfiable(n: Need, total_gpus: int) -> str | None:
    """Why a job can never start on this cluster, or None."""
    if n.all_gpus and total_gpus == 0:
        return "the job asks for GPUs but the cluster has none (`ray status`)"
    if n.gpus > total_gpus:
        return f"the job asks for {n.gpus} GPU(s) but the cluster has {total_gpus}"
    return None


def allocate(n: Need, busy: set[str], total_gpus: int) -> frozenset[str] | None:
    """The slots the job would take now, or None when too few are free."""
    free = free_slots(n, busy, total_gpus)
    if len(free) >= n.wanted(total_gpus):
        return frozenset(free[: n.wanted(total_gpus)])
    if n.min_count is not None and len(free) >= n.min_count:
        return frozenset(free)
    return None


def schedule(
    queue: Sequence[tuple[str, Need]],
    running: Sequence[Running],
    total_gpus: int,
    *,
    strict_order: bool = False,
) -> Moves:
    """The jobs of `queue` (in submission order) that start now with their slots, and the
    resizes of running elastic jobs."""
    busy = {s for r in running for s in r.slots}
    held: set[str] = set()  # free slots a waiting job asks for
    moves = Moves()
    head = None
    order = sorted(range(len(queue)), key=lambda i: (-queue[i][1].priority, i))
    for job_id, n in (queue[i] for i in order):
        if unsatisfiable(n, total_gpus):
            continue
        slots = allocate(n, busy | held, total_gpus)
        if slots is not None:
            busy |= slots
            moves.starts.append((job_id, slots))
            continue
        if head is None:
            head = job_id
            moves.resizes.extend(_shrinks_for(job_id, n, running, busy | held, total_gpus))
        if strict_order:
            break
        free = free_slots(n, busy | held, total_gpus)
        held |= set(free[: n.wanted(total_gpus)])
    shrunk = {r.job_id for r in moves.resizes}
    for r in sorted(running, key=lambda r: -r.need.priority):
        if r.need.min_count is None or r.resizing or r.job_id in shrunk:
            continue
        room = r.need.wanted(total_gpus) - len(r.slots)
        extra = free_slots(r.need, busy | held, total_gpus)[:room]
        if extra:
            busy |= set(extra)
            why = f"grew into freed devices ({', '.join(sorted(extra))})"
            moves.resizes.append(Resize(r.job_id, r.slots | frozenset(extra), "grew", why))
    return moves


def _shrinks_for(
    head: str, n: Need, running: Sequence[Running], taken: set[str], total_gpus: int
) -> list[Resize]:
    """Shrinks of running elastic jobs that let `head` start, or none when they cannot."""
    usable = (lambda s: s in n.named) if n.named else (lambda s: s.startswith("gpu#"))
    coming = {s for r in running for s in r.releasing if usable(s)}
    lacking = n.floor(total_gpus) - len(free_slots(n, taken, total_gpus)) - len(coming)
    if lacking <= 0:
        return []  # resizes under way free enough
    shrinks = []
    candidates = [
        r for r in running
        if r.need.min_count is not None and not r.resizing and r.need.priority <= n.priority
    ]  # fmt: skip
    for r in sorted(candidates, key=lambda r: (r.need.priority, -len(r.slots))):
        spare = len(r.slots) - r.need.floor(total_gpus)
        give = sorted((s for s in r.slots if usable(s)), key=_slot_order, reverse=True)
        give = give[: min(spare, lacking)]
        if give:
            why = f"shrank for job {head}"
            shrinks.append(Resize(r.job_id, r.slots - set(give), "shrank", why))
            lacking -= len(give)
        if lacking <= 0:
            return shrinks
    return []


def free_slots(n: Need, taken: set[str], total_gpus: int) -> list[str]:
    """The job's slots not taken, in order."""
    if n.named:
        return [s for s in n.named if s not in taken]
    return [f"gpu#{i}" for i in range(total_gpus) if f"gpu#{i}" not in taken]


def _gpu_index(slot: str) -> int:
    return int(slot.removeprefix("gpu#"))


def _slot_order(slot: str) -> tuple[str, int]:
    name, _, index = slot.rpartition("#")
    return name, int(index)
