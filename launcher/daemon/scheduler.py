"""Gang scheduling over device slots: a job starts only when every device it asks for is free.

A slot is one device. A simulated device named `sim-a100` with `count: 2` is
the slots `sim:sim-a100#0` and `sim:sim-a100#1`: two jobs naming the same
simulated device wait for each other, jobs on disjoint names run side by side.
GPUs are the slots `gpu#0 .. gpu#N-1` (N: the cluster's GPUs); a job asking for
`count: k` takes any k free ones, `all` (and `name`, which the runner reserves as
every GPU) takes them all.

`pick` is a pure function: the queue in order, the busy slots, the GPU count in,
the jobs to start out. Queued jobs start in order; a job that cannot start does
not block a later job whose devices are free (no head-of-line blocking) unless
`strict_order` is set. Jobs that can never fit are reported, not left to wait.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from launcher.job.spec import JobSpec


@dataclass(frozen=True)
class Need:
    """What a job needs: named slots, plus `gpus` interchangeable GPUs."""

    named: frozenset[str]
    gpus: int = 0
    all_gpus: bool = False


def need(spec: JobSpec) -> Need:
    sel = spec.devices
    if sel.select == "simulated":
        return Need(frozenset(f"sim:{s.name}#{i}" for s in sel.simulated for i in range(s.count)))
    if sel.select == "count":
        return Need(frozenset(), gpus=int(sel.count or 0))
    return Need(frozenset(), all_gpus=True)


def unsatisfiable(n: Need, total_gpus: int) -> str | None:
    """Why a job can never start on this cluster, or None."""
    if n.all_gpus and total_gpus == 0:
        return "the job asks for GPUs but the cluster has none (`ray status`)"
    if n.gpus > total_gpus:
        return f"the job asks for {n.gpus} GPU(s) but the cluster has {total_gpus}"
    return None


def allocate(n: Need, busy: set[str], total_gpus: int) -> frozenset[str] | None:
    """The slots the job would take now, or None when they are not all free."""
    if n.named & busy:
        return None
    free_gpus = _free_gpus(busy, total_gpus)
    want = _gpus_wanted(n, total_gpus)
    if len(free_gpus) < want:
        return None
    return n.named | frozenset(free_gpus[:want])


def _free_gpus(busy: set[str], total_gpus: int) -> list[str]:
    return [f"gpu#{i}" for i in range(total_gpus) if f"gpu#{i}" not in busy]


def _gpus_wanted(n: Need, total_gpus: int) -> int:
    return total_gpus if n.all_gpus else n.gpus


def pick(
    queue: Sequence[tuple[str, Need]],
    busy: Iterable[str],
    total_gpus: int,
    *,
    strict_order: bool = False,
) -> list[tuple[str, frozenset[str]]]:
    """Jobs of `queue` (in order) that start now, each with the slots it takes."""
    taken = set(busy)
    started = []
    for job_id, n in queue:
        if unsatisfiable(n, total_gpus):
            continue
        slots = allocate(n, taken, total_gpus)
        if slots is None:
            if strict_order:
                break
            # Hold what it asks for, so later jobs cannot overtake it for ever.
            taken |= n.named
            taken |= set(_free_gpus(taken, total_gpus)[: _gpus_wanted(n, total_gpus)])
            continue
        taken |= slots
        started.append((job_id, slots))
    return started
