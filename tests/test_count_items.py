"""`Accumulator.step(..., count_items=...)` without `global_items`, on real gloo ranks: the
item count is summed over the ranks (one small all-reduce) and each rank's loss weighted
by the global count, so the step is the full-batch mean gradient (invariant 3 of
docs/design.md) however unevenly the ranks' items fall.

The ranks here hold very different numbers of target tokens (sequences of 2 to 24
tokens): weighting by a rank's own count would give its tokens the wrong share.
"""

from __future__ import annotations

import pytest
import torch
from distributed import run_ranks
from test_accumulate import (
    PLANS,
    full_batch_grads,
    global_items,
    micro_batches,
    model_and_loss,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from autobatch.step.accumulate import Accumulator
from autobatch.tasks.losses import IGNORE_INDEX


def count_targets(micro_batch: dict) -> int:
    return int((micro_batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def counted_step(rank: int, world_size: int) -> dict:
    """One step of the token loss, counting items per micro-batch; the gradients read off an
    SGD(lr=1) update, and what the step reported."""
    sizes_by_rank = PLANS[world_size]
    model, loss_fn = model_and_loss("token", torch.float64)
    ddp = DDP(model)
    before = [p.detach().clone() for p in model.parameters()]
    acc = Accumulator(ddp, torch.optim.SGD(ddp.parameters(), lr=1.0))
    lo = sum(map(sum, sizes_by_rank[:rank]))
    mbs = micro_batches("token", torch.float64, lo, sizes_by_rank[rank])
    result = acc.step(mbs, loss_fn, count_items=count_targets)
    grads = [b - p.detach() for b, p in zip(before, model.parameters())]
    return {"grads": grads, "local": result.local_items, "global": result.global_items}


@pytest.mark.parametrize("world_size", [2, 3])
def test_counted_items_are_summed_over_ranks_and_give_the_full_batch_gradient(world_size):
    results = run_ranks(counted_step, world_size)
    n = sum(map(sum, PLANS[world_size]))
    tokens = global_items("token", n)  # target tokens of the whole global batch
    assert [r["global"] for r in results] == [tokens] * world_size  # every rank, the sum
    assert sum(r["local"] for r in results) == tokens
    assert len({r["local"] for r in results}) == world_size  # uneven: the test can tell
    reference = full_batch_grads("token", torch.float64, n)
    for r in results:
        for got, want in zip(r["grads"], reference):
            assert (got - want).abs().max().item() <= 1e-12
