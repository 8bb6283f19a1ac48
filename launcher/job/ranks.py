"""The ranks of one attempt: start them (actors, rendezvous, process group, train) and wait
for them, hearing a cancel and grouping their failures for the failure policy.

Every wait polls `check_stop` every POLL_S seconds, so a cancel is heard in any phase.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from launcher.job import cluster
from launcher.job.context import RankContext, RankOutcome
from launcher.job.placement import Placement
from launcher.job.policy import RankFailure

FAILURE_GRACE_S = 2.0  # how long the other ranks have to report after one fails
POLL_S = 0.5  # how often a wait looks at the stop event


class AttemptFailed(Exception):
    """An attempt ended with these failures (raised inside the launcher only)."""

    def __init__(self, failures: list[RankFailure]) -> None:
        super().__init__("; ".join(map(str, failures)))
        self.failures = failures


def wait_refs(refs: list, timeout_s: float, what: str, check_stop: Callable[[], None]) -> list:
    """`cluster.wait_all`, calling `check_stop` (which raises to cancel) every POLL_S."""
    pending, waited = list(refs), 0.0
    while pending:
        check_stop()
        if waited >= timeout_s:
            return cluster.wait_all(refs, 0, what)  # names the ranks that did not answer
        step = min(POLL_S, timeout_s - waited)
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=step)
        waited += step
    return ray.get(refs)


def collect(refs: list, what: str, check_stop: Callable[[], None]) -> list:
    """The actors' answers; a dead actor or a failed call fails the attempt."""
    try:
        return wait_refs(refs, cluster.ACTOR_TIMEOUT_S, what, check_stop)
    except (RayActorError, RayTaskError) as exc:
        raise AttemptFailed([RankFailure(-1, "lost", f"{what}: {cluster.cause(exc)}")]) from None


def launch(
    placement: Placement,
    ranked: Sequence[cluster.ProbedDevice],
    collector: Any,
    context: Callable[[int, cluster.ProbedDevice], RankContext],
    check_stop: Callable[[], None],
) -> list:
    """Start a rank on each of `ranked` (in rank order): its actor, the rendezvous at rank
    0's address, the process group, then its train() call (whose refs are returned)."""
    actors = placement.assign_ranks([d.index for d in ranked])
    addresses = collect([a.address.remote() for a in actors], "training actors", check_stop)
    ip, port, _ = addresses[0]
    backend = "nccl" if all(d.info.is_cuda for d in ranked) else "gloo"
    master, world = f"tcp://{ip}:{port}", len(ranked)
    joins = [a.join.remote(master, r, world, backend, 120) for r, a in enumerate(actors)]
    collect(joins, "process group set-up", check_stop)
    ray.get(collector.begin_attempt.remote())
    return [
        actor.train.remote(context(rank, d), collector)
        for rank, (actor, d) in enumerate(zip(actors, ranked))
    ]


def wait_ranks(
    refs: list, check_stop: Callable[[], None], on_progress: Callable[[], None]
) -> list[RankOutcome]:
    """Every rank's outcome; `on_progress` after each wait. Raises AttemptFailed with the
    failures of every rank that failed within FAILURE_GRACE_S of the first."""
    pending = list(refs)
    while pending:
        check_stop()
        done, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
        failures = [f for ref in done if (f := cluster.failure_of(refs, ref))]
        if failures:
            # The first failure is often a consequence (a peer's collective breaking):
            # give the other ranks a moment to fail too, and judge by the root cause.
            more, _ = ray.wait(pending, num_returns=len(pending), timeout=FAILURE_GRACE_S)
            failures += [f for ref in more if (f := cluster.failure_of(refs, ref))]
            on_progress()  # what the ranks reported last, the failing step included
            raise AttemptFailed(failures)
        on_progress()
    return ray.get(refs)
