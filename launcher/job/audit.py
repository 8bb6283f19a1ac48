"""The audit ledger of one rank: which dataset indices it processed, step by step.

`benchmarks/ledger.py` reads it back and checks that every global batch was exact.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

from autobatch.errors import StorageError
from autobatch.step import storage
from autobatch.step.atomic import storage_error
from launcher.job.context import RankContext


class AuditLedger:
    """Every step's dataset indices of this rank, one JSON line per try of a step.

    Written before the step's collectives: a rank killed right after the gradient
    all-reduce (the step then done on every rank) still has its line. A step tried
    again (in place after an out-of-memory, in a later attempt, or in a later run on
    the same checkpoint directory) is written again; each line names its run and the
    attempt within it, and a step's last try (the newest run's highest attempt, the
    rank's last line of it) is what the rank processed (benchmarks/ledger.py).

    A local checkpoint directory: each line appended to samples-rank<r>.jsonl as the step
    starts. An object store (no append): the lines are kept and written as segment
    objects, samples-rank<r>/<run>-a<attempt>-<seq>.jsonl, at every checkpoint (before it
    can count as complete) and at the end of the attempt; the steps of a killed attempt
    after its last checkpoint lose their lines, and are redone, with lines, on resume."""

    def __init__(self, ctx: RankContext) -> None:
        self.store = storage.Storage(ctx.checkpoint_dir)
        self.segmented = not self.store.local
        self.rank, self.run, self.attempt = ctx.rank, ctx.run, ctx.attempt
        self._pending: list[str] = []
        self._seq = 0
        d = pathlib.Path(self.store.root)
        self.path = d / f"samples-rank{ctx.rank}.jsonl"
        if not self.segmented:
            self._write(lambda: d.mkdir(parents=True, exist_ok=True))

    def record(self, step: int, micro_batches: list) -> None:
        line = json.dumps(
            {
                "run": self.run,
                "attempt": self.attempt,
                "step": step,
                "micro_batches": [[int(i) for i in mb] for mb in micro_batches],
            }
        )
        if self.segmented:
            self._pending.append(line)
        else:
            self._write(lambda: _append_line(self.path, line))

    def flush(self, *, quiet: bool = False) -> None:
        """The kept lines as one segment object (an object store; nothing to do locally).
        `quiet`: an error is already in flight, this one is not raised over it."""
        if not self._pending:
            return
        name = (
            f"samples-rank{self.rank}/{self.run or 'run'}-a{self.attempt:04d}-{self._seq:06d}.jsonl"
        )
        data = ("\n".join(self._pending) + "\n").encode()
        try:
            self.store.write_bytes(name, data)
        except StorageError as exc:
            if quiet:
                return
            raise StorageError(f"audit ledger: {exc}", exc.path) from exc
        except Exception:
            if quiet:
                return
            raise
        self._pending, self._seq = [], self._seq + 1

    def _write(self, write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as exc:
            fault = storage_error(self.path.parent, exc)
            if fault is None:
                raise
            raise StorageError(f"audit ledger: {fault}", fault.path) from exc


def _append_line(path: pathlib.Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")
