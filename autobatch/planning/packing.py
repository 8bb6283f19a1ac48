"""Length-aware micro-batching: one global batch of variable-length sequences, per rank.

Memory and time depend on tokens, not samples. The plan is made at the worst
case the job allows (every sequence at the maximum length): device r fits
`max_micro_batch` of them, so its micro-batch budget is that many x the
maximum length in padded tokens, and its time model per padded token is the
per-sample time / the maximum length. Each step, `pack_global_batch` then

1. splits the B sequences of the global batch between the ranks by predicted
   time, not by count: longest first, each to the rank that would finish it
   earliest (the plan's fixed, per-token and per-step costs), and
2. packs each rank's share, sorted by length, into micro-batches under its
   token budget, so short sequences make large micro-batches and long ones
   small: a sequence joins the last micro-batch (padded to its width) unless
   opening a new one is predicted to be cheaper.

The result is a pure function of (global batch, lengths, plan): every rank
computes the same split without a collective, and the global batch stays the
same B sequences whatever the mix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autobatch.errors import PlanError
from autobatch.planning.plan import Plan


@dataclass(frozen=True)
class TokenBudget:
    """One rank's limits and time model in tokens."""

    max_tokens: int  # padded tokens per micro-batch (width x count)
    fixed_s: float  # per micro-step
    per_token_s: float  # per padded token
    step_overhead_s: float = 0.0


def token_budgets(plan: Plan, max_len: int) -> list[TokenBudget]:
    """Per rank of `plan` (made at sequences of `max_len` tokens), its budget in tokens."""
    if max_len < 1:
        raise PlanError(f"max_len={max_len} must be >= 1")
    by_id = {d.device_id: d for d in plan.inputs}
    budgets = []
    for r in plan.ranks:
        d = by_id.get(r.device_id)
        if d is None:
            raise PlanError(f"the plan has no time model for rank {r.rank} ({r.device_id})")
        budgets.append(
            TokenBudget(
                max_tokens=d.max_micro_batch * max_len,
                fixed_s=d.fixed_s,
                per_token_s=d.per_sample_s / max_len,
                step_overhead_s=d.step_overhead_s,
            )
        )
    return budgets


@dataclass
class _Share:
    """A rank's share as it grows, longest sequence first, packed as it goes."""

    budget: TokenBudget
    micro_batches: list[list[int]]
    widths: list[int]  # the longest sequence of each micro-batch (its padded width)
    time_s: float = 0.0

    def cost_of(self, length: int) -> float:
        """Predicted extra time of appending a sequence of `length` (<= every one so far)."""
        return self._options(length)[0]

    def append(self, index: int, length: int) -> None:
        cost, joins = self._options(length)
        self.time_s += cost
        if joins:
            self.micro_batches[-1].append(index)
        else:
            self.micro_batches.append([index])
            self.widths.append(length)

    def _options(self, length: int) -> tuple[float, bool]:
        """The cheaper of joining the last micro-batch (padded to its width, if the budget
        allows) and opening a new one of this width: (cost, joins)."""
        b = self.budget
        opening = b.step_overhead_s if not self.micro_batches else 0.0
        new = (opening + b.fixed_s + b.per_token_s * length, False)
        if self.micro_batches and (len(self.micro_batches[-1]) + 1) * self.widths[-1] <= (
            b.max_tokens
        ):
            return min((b.per_token_s * self.widths[-1], True), new)
        return new


def pack_global_batch(
    indices: Sequence[int], lengths: Sequence[int], budgets: Sequence[TokenBudget]
) -> list[list[list[int]]]:
    """Per rank, its micro-batches (lists of dataset indices) for one global batch.

    Every index lands in exactly one micro-batch, and every rank gets at least one
    (each rank runs one synced backward per step). A micro-batch's padded tokens
    (count x its longest sequence) stay within the rank's budget.
    """
    if len(indices) != len(lengths):
        raise PlanError(f"{len(indices)} indices but {len(lengths)} lengths")
    if len(indices) < len(budgets):
        raise PlanError(
            f"a global batch of {len(indices)} sequences cannot give each of the "
            f"{len(budgets)} ranks one"
        )
    for b in budgets:
        longest = max(lengths)
        if b.max_tokens < longest:
            raise PlanError(
                f"a rank's micro-batch budget of {b.max_tokens} tokens is below the longest "
                f"sequence ({longest} tokens): plan at the job's maximum sequence length"
            )
    order = sorted(range(len(indices)), key=lambda i: (-lengths[i], i))
    shares = [_Share(b, [], []) for b in budgets]
    for pos in order:
        length = lengths[pos]
        best = min(
            range(len(shares)), key=lambda r: (shares[r].time_s + shares[r].cost_of(length), r)
        )
        shares[best].append(pos, length)
    _give_every_rank_one(shares, lengths)
    return [[[int(indices[p]) for p in mb] for mb in s.micro_batches] for s in shares]


def _give_every_rank_one(shares: list[_Share], lengths: Sequence[int]) -> None:
    """A rank left empty (too slow to help) takes the shortest sequence of the rank with the
    most; that rank's share is repacked."""
    for empty in (s for s in shares if not s.micro_batches):
        donor = max(shares, key=lambda s: (sum(map(len, s.micro_batches)), s.time_s))
        members = [p for mb in donor.micro_batches for p in mb]
        shortest = max(members, key=lambda p: (-lengths[p], p))
        members.remove(shortest)
        donor.micro_batches, donor.widths, donor.time_s = [], [], 0.0
        for p in sorted(members, key=lambda p: (-lengths[p], p)):
            donor.append(p, lengths[p])
        empty.append(shortest, lengths[shortest])


def padding_waste(micro_batches: Sequence[Sequence[int]], lengths_of: dict[int, int]) -> float:
    """Padded tokens / all tokens of micro-batches padded to their longest sequence."""
    padded = real = 0
    for mb in micro_batches:
        lens = [lengths_of[i] for i in mb]
        padded += len(lens) * max(lens)
        real += sum(lens)
    return 0.0 if padded == 0 else (padded - real) / padded
