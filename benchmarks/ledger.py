"""The audit ledger of a job (`audit_samples: true`): were its global batches exact?

Every rank appends one line per try of a step to <checkpoint dir>/samples-rank<r>.jsonl,
naming the run (one JobController run: a resubmit, or a re-queue after the daemon's
supervisor died, is a new run on the same files) and the attempt within it. A step's
last try is the newest run's highest attempt that tried it, over every rank that wrote
one: a rank that left the job (a resize, a lost device) has no line of the later
attempt, and of one try a rank's last line counts (an out-of-memory retried in place
writes the step again). Run ids sort as the runs began; lines without one (a ledger
written before runs were named) are of a run older than any named one.
"""

from __future__ import annotations

import json
import pathlib

from autobatch.planning.sampler import GlobalBatchSampler


def last_tries(ckpt_dir: str | pathlib.Path) -> dict[int, list[int]]:
    """Per step, the dataset indices of its last try, over every rank (sorted)."""
    tries: dict[int, dict[tuple[str, int], dict[str, list[int]]]] = {}
    for path in sorted(pathlib.Path(ckpt_dir).glob("samples-rank*.jsonl")):
        for line in path.read_text().splitlines():
            e = json.loads(line)
            indices = [i for mb in e["micro_batches"] for i in mb]
            by_try = tries.setdefault(e["step"], {})
            by_try.setdefault((e.get("run", ""), e["attempt"]), {})[path.name] = indices
    return {
        step: sorted(i for indices in by_try[max(by_try)].values() for i in indices)
        for step, by_try in tries.items()
    }


def exact_global_batches(
    ckpt_dir: str | pathlib.Path, dataset_size: int, global_batch: int, seed: int, steps: int
) -> bool:
    """Steps 0..steps-1 are all there, each the sampler's global batch (its last try)."""
    tried = last_tries(ckpt_dir)
    if sorted(tried) != list(range(steps)):
        return False
    sampler = GlobalBatchSampler(dataset_size, global_batch, seed=seed)
    return all(
        indices == sorted(sampler.global_batch(step).tolist()) for step, indices in tried.items()
    )
