"""The audit ledger of a job (`audit_samples: true`): were its global batches exact?

Every rank writes one line per try of a step: in a local checkpoint directory appended to
<checkpoint dir>/samples-rank<r>.jsonl; on an object store (s3://, gs://: no append) in
segment objects <checkpoint dir>/samples-rank<r>/<run>-a<attempt>-<seq>.jsonl, written at
every checkpoint and at the end of each attempt (both shapes are read, through
autobatch.step.storage). Each line names the run (one JobController run: a resubmit, or a
re-queue after the daemon's supervisor died, is a new run on the same files) and the
attempt within it. A step's
last try is the newest run's highest attempt that tried it, over every rank that wrote
one: a rank that left the job (a resize, a lost device) has no line of the later
attempt, and of one try a rank's last line counts (an out-of-memory retried in place
writes the step again). Run ids sort as the runs began; lines without one (a ledger
written before runs were named) are of a run older than any named one.
"""

from __future__ import annotations

import json
import pathlib
import re

from autobatch.planning.sampler import GlobalBatchSampler
from autobatch.step.storage import Storage

_LEDGER = re.compile(r"samples-rank(\d+)(\.jsonl)?")


def rank_lines(ckpt_dir: str | pathlib.Path) -> list[tuple[int, str]]:
    """Every ledger line in `ckpt_dir` with its rank, each rank's in the order written."""
    store = Storage(ckpt_dir)
    out = []
    for name in store.names():
        m = _LEDGER.fullmatch(name)
        if m is None:
            continue
        rank = int(m.group(1))
        if m.group(2):  # a local file of appended lines
            texts = [store.read_bytes(name).decode()]
        else:  # segment objects, named so that they sort as written
            texts = [
                store.read_bytes(f"{name}/{seg}").decode()
                for seg in store.names(name)
                if seg.endswith(".jsonl")
            ]
        out += [(rank, line) for text in texts for line in text.splitlines() if line]
    return out


def last_tries(ckpt_dir: str | pathlib.Path) -> dict[int, list[int]]:
    """Per step, the dataset indices of its last try, over every rank (sorted)."""
    tries: dict[int, dict[tuple[str, int], dict[int, list[int]]]] = {}
    for rank, line in rank_lines(ckpt_dir):
        e = json.loads(line)
        indices = [i for mb in e["micro_batches"] for i in mb]
        by_try = tries.setdefault(e["step"], {})
        by_try.setdefault((e.get("run", ""), e["attempt"]), {})[rank] = indices
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
