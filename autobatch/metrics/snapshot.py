"""What each rank reports after an optimizer step, and the one interface it goes through.

A training rank builds a `RankSnapshot` (a frozen, JSON-serialisable value)
after each optimizer step and pushes it to a `MetricsSink`: `PrometheusSink`
(autobatch.metrics.prometheus) for Grafana, or `JsonlSink` here, which appends
snapshots to a file, one JSON object a line.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import KW_ONLY, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from autobatch.planning.plan import Plan

# The label names of every per-rank series. The job id is `job_id`, not `job`: Prometheus
# owns `job` (the scrape job; the Prometheus Operator sets it to the Service name), and
# with honor_labels false a target's own `job` label is renamed `exported_job`.
LABELS = ("job_id", "rank", "node", "device", "device_uuid")

# Why an elastic job's device set changed during its run (`RankSnapshot.resizes_total`).
RESIZE_REASONS = ("grew", "shrank", "device_lost")

# The latest rebalances a rank-0 snapshot carries (`RankSnapshot.rebalances`).
REPORTED = 8


@dataclass(frozen=True)
class RankSnapshot:
    """What one rank reports after an optimizer step.

    Memory fields are None where they cannot be measured (no NVML, CPU device);
    a None is left out of the exposition. Totals are cumulative over the rank's
    life. `step_durations_s` holds every step duration since the previous
    snapshot, so a collector can build a histogram without seeing every step.
    """

    job: str
    rank: int
    node: str
    device: str
    _: KW_ONLY
    device_uuid: str = ""
    simulated: bool = False
    timestamp_s: float = field(default_factory=time.time)
    # memory, bytes
    device_memory_total_bytes: int | None = None
    device_memory_used_bytes: int | None = None
    torch_memory_allocated_bytes: int | None = None
    torch_memory_reserved_bytes: int | None = None
    torch_memory_peak_bytes: int | None = None
    plan_predicted_peak_bytes: int | None = None
    # the plan
    micro_batch_size: int = 0
    accumulation_steps: int = 0
    rank_samples_per_step: int = 0
    global_batch_size: int = 0
    plan_efficiency_ratio: float | None = None
    # the last step
    effective_global_batch_size: int | None = None
    step_duration_s: float | None = None
    sync_wait_s: float | None = None
    # this rank's compute in the last step (its micro-steps' forward and backward, not the
    # wait at the all-reduce), measured, and as its plan predicted it for those micro-batches
    rank_compute_s: float | None = None
    plan_predicted_compute_s: float | None = None
    train_loss: float | None = None
    padding_waste_ratio: float | None = None  # variable-length data: padded / all tokens
    # this rank's last checkpoint: how long the training loop was blocked by the save (the
    # previous write finishing, the copy to host memory), and how long its last completed
    # write took in the background after the copy
    checkpoint_stall_s: float | None = None
    checkpoint_write_s: float | None = None
    step_durations_s: tuple[float, ...] = ()
    # totals
    samples_processed_total: int = 0
    tokens_processed_total: int = 0
    optimizer_steps_total: int = 0
    oom_events_total: int = 0
    worker_restarts_total: int = 0
    replans_total: Mapping[str, int] = field(default_factory=dict)
    # elastic jobs: the ranks of this rank's process group when it took the step (measured),
    # and the job's resizes so far by reason (RESIZE_REASONS)
    world_size: int = 1
    resizes_total: Mapping[str, int] = field(default_factory=dict)
    # the job's optimizer steps done, from the start of its run (resumes and resizes
    # included); optimizer_steps_total counts this rank's own since it started
    step: int = 0
    # closed-loop balance: the job's rebalances so far, and (rank 0) the latest REPORTED of
    # them, each {"step", "before_s", "after_s", "ratios", "micro_batches"}
    rebalances_total: int = 0
    rebalances: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not self.job:
            raise ValueError("RankSnapshot.job must be a non-empty job name")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"RankSnapshot.rank={self.rank!r} must be an integer >= 0")
        ws = self.world_size
        if isinstance(ws, bool) or not isinstance(ws, int) or ws < 1:
            raise ValueError(f"RankSnapshot.world_size={ws!r} must be an integer >= 1")
        durations = tuple(float(d) for d in self.step_durations_s)
        bad = [d for d in durations if not (math.isfinite(d) and d >= 0)]
        if bad:
            raise ValueError(
                f"RankSnapshot.step_durations_s has {bad[:3]!r}: durations must be finite and >= 0"
            )
        object.__setattr__(self, "step_durations_s", durations)
        object.__setattr__(self, "replans_total", dict(self.replans_total))
        object.__setattr__(self, "resizes_total", dict(self.resizes_total))
        object.__setattr__(self, "rebalances", tuple(dict(r) for r in self.rebalances))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RankSnapshot:
        known = {f.name for f in fields(cls) if f.name != "_"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"RankSnapshot: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> RankSnapshot:
        return cls.from_dict(json.loads(text))


def plan_fields(plan: Plan, rank: int) -> dict[str, Any]:
    """The snapshot fields a rank takes from its plan: `RankSnapshot(..., **plan_fields(p, r))`."""
    r = plan.ranks[rank]
    return {
        "micro_batch_size": r.micro_batch_size,
        "accumulation_steps": r.accumulation_steps,
        "rank_samples_per_step": r.samples,
        "global_batch_size": plan.global_batch_size,
        "plan_predicted_peak_bytes": r.predicted_peak_bytes,
        "plan_efficiency_ratio": plan.efficiency,
    }


@runtime_checkable
class MetricsSink(Protocol):
    """Where snapshots go. One method, so a rank can push to any backend."""

    def push(self, snapshot: RankSnapshot) -> None: ...


class JsonlSink:
    """Appends each snapshot as one JSON line (benchmarks, offline runs)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = self.path.open("a", encoding="utf-8")

    def push(self, snapshot: RankSnapshot) -> None:
        line = snapshot.to_json() + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[RankSnapshot]:
    """The snapshots a `JsonlSink` wrote, in order."""
    with Path(path).open(encoding="utf-8") as f:
        return [RankSnapshot.from_json(line) for line in f if line.strip()]
