"""The audit ledger of a job (`audit_samples: true`): were its global batches exact?

Every rank appends one line per try of a step to <checkpoint dir>/samples-rank<r>.jsonl.
A step's last try is its highest attempt, over every rank that wrote one: a rank that
left the job (a resize, a lost device) has no line of the later attempt.
"""

from __future__ import annotations

import json
import pathlib

from autobatch.planning.sampler import GlobalBatchSampler


def exact_global_batches(
    ckpt_dir: str | pathlib.Path, dataset_size: int, global_batch: int, seed: int, steps: int
) -> bool:
    """Steps 0..steps-1 are all there, each the sampler's global batch (its last try)."""
    tries: dict[int, dict[tuple[int, str], list[int]]] = {}
    for path in pathlib.Path(ckpt_dir).glob("samples-rank*.jsonl"):
        for line in path.read_text().splitlines():
            e = json.loads(line)
            indices = [i for mb in e["micro_batches"] for i in mb]
            tries.setdefault(e["step"], {})[(e["attempt"], path.name)] = indices
    if sorted(tries) != list(range(steps)):
        return False
    sampler = GlobalBatchSampler(dataset_size, global_batch, seed=seed)
    for step, by_try in tries.items():
        last = max(attempt for attempt, _ in by_try)
        got = sorted(i for (a, _), idx in by_try.items() if a == last for i in idx)
        if got != sorted(sampler.global_batch(step).tolist()):
            return False
    return True
