"""Loss functions shared by the built-in tasks: each returns the SUM over its items.

The accumulator weights a micro-batch's summed loss by world_size / N_global
(invariant 3 of docs/design.md); a mean here would over-weight small micro-batches.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100  # a label that is not a target (prompt, padding), as Hugging Face uses


def next_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropies of each position's logits against the next label, over
    labels != -100, in at least float32."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
