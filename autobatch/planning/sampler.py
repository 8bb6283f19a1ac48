"""Split-invariant data order: the same global batches whatever the device mix.

The data stream is a seeded permutation of the dataset per epoch. Global batch
j is a pure function of (seed, dataset size, global batch size, j): it never
depends on the plan, so a job on one device and the same job on seven mixed
devices see the same samples in the same optimizer steps. A rank then takes its
contiguous share of that batch (`Plan.rank_offsets`) and cuts it into its own
micro-batches.

At an epoch end the sampler never yields a short global batch:

* ``epoch_end="drop"`` (default) skips the last N mod B samples of each epoch;
* ``epoch_end="carry"`` lets a global batch run on into the next epoch's
  permutation, so no sample is skipped.

The state to checkpoint is the number of optimizer steps taken; restoring it
(under any plan) continues at the exact next global batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from autobatch.errors import SamplerError
from autobatch.planning.plan import Plan

EpochEnd = Literal["drop", "carry"]


@dataclass(frozen=True)
class SamplerState:
    seed: int
    dataset_size: int
    global_batch_size: int
    epoch_end: EpochEnd
    step: int  # optimizer steps already taken = index of the next global batch

    def to_dict(self) -> dict:
        return asdict(self)


class GlobalBatchSampler:
    """Yields the dataset indices of each global batch, and of each rank's micro-batches."""

    def __init__(
        self,
        dataset_size: int,
        global_batch_size: int,
        *,
        seed: int = 0,
        epoch_end: EpochEnd = "drop",
        step: int = 0,
    ) -> None:
        if dataset_size < 1:
            raise SamplerError(f"dataset_size={dataset_size} must be >= 1")
        if global_batch_size < 1:
            raise SamplerError(f"global_batch_size={global_batch_size} must be >= 1")
        if epoch_end not in ("drop", "carry"):
            raise SamplerError(f"epoch_end={epoch_end!r} must be 'drop' or 'carry'")
        if epoch_end == "drop" and dataset_size < global_batch_size:
            raise SamplerError(
                f"dataset of {dataset_size} samples is smaller than global_batch_size="
                f"{global_batch_size}: no full global batch fits in an epoch; lower the global "
                "batch or use epoch_end='carry'"
            )
        if step < 0:
            raise SamplerError(f"step={step} must be >= 0")
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.epoch_end: EpochEnd = epoch_end
        self.step = step
        self._perm_cache: tuple[int, np.ndarray] | None = None

    # -- epochs ----------------------------------------------------------
    @property
    def steps_per_epoch(self) -> float:
        """Whole global batches per epoch ('drop'), or the exact fraction ('carry')."""
        if self.epoch_end == "drop":
            return self.dataset_size // self.global_batch_size
        return self.dataset_size / self.global_batch_size

    @property
    def epoch(self) -> int:
        """The epoch the next global batch starts in."""
        if self.epoch_end == "drop":
            return self.step // (self.dataset_size // self.global_batch_size)
        return self.step * self.global_batch_size // self.dataset_size

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm_cache = (epoch, rng.permutation(self.dataset_size))
        return self._perm_cache[1]

    # -- batches ---------------------------------------------------------
    def global_batch(self, step: int | None = None) -> np.ndarray:
        """Dataset indices of global batch `step` (default: the next one)."""
        step = self.step if step is None else step
        B, N = self.global_batch_size, self.dataset_size
        if self.epoch_end == "drop":
            per_epoch = N // B
            epoch, j = divmod(step, per_epoch)
            return self.permutation(epoch)[j * B : (j + 1) * B].copy()
        start = step * B
        parts, need = [], B
        while need:
            epoch, offset = divmod(start, N)
            take = min(need, N - offset)
            parts.append(self.permutation(epoch)[offset : offset + take])
            start, need = start + take, need - take
        return np.concatenate(parts)

    def rank_share(self, plan: Plan, rank: int, step: int | None = None) -> np.ndarray:
        """Rank `rank`'s contiguous share of a global batch."""
        self._check_plan(plan)
        offset = plan.rank_offsets()[rank]
        return self.global_batch(step)[offset : offset + plan.ranks[rank].samples]

    def micro_batches(self, plan: Plan, rank: int, step: int | None = None) -> list[np.ndarray]:
        """Rank `rank`'s share of a global batch, cut into its planned micro-batches."""
        share = self.rank_share(plan, rank, step)
        bounds = np.cumsum(plan.ranks[rank].micro_batches)[:-1]
        return np.split(share, bounds)

    def advance(self) -> None:
        """Mark the current global batch as consumed (after the optimizer step)."""
        self.step += 1

    def _check_plan(self, plan: Plan) -> None:
        if plan.global_batch_size != self.global_batch_size:
            raise SamplerError(
                f"plan is for global batch {plan.global_batch_size}, sampler for "
                f"{self.global_batch_size}: a re-plan must keep the global batch"
            )

    # -- checkpoint --------------------------------------------------------
    def state(self) -> SamplerState:
        return SamplerState(
            self.seed, self.dataset_size, self.global_batch_size, self.epoch_end, self.step
        )

    @classmethod
    def from_state(cls, state: SamplerState | dict) -> GlobalBatchSampler:
        s = state if isinstance(state, SamplerState) else SamplerState(**state)
        return cls(
            s.dataset_size, s.global_batch_size, seed=s.seed, epoch_end=s.epoch_end, step=s.step
        )

    def check_resume(self, state: SamplerState | dict) -> None:
        """Raise if a checkpointed state belongs to a different data order than this sampler."""
        s = state if isinstance(state, SamplerState) else SamplerState(**state)
        mine = self.state()
        for name in ("seed", "dataset_size", "global_batch_size", "epoch_end"):
            if getattr(s, name) != getattr(mine, name):
                raise SamplerError(
                    f"checkpoint has {name}={getattr(s, name)!r} but the job has "
                    f"{getattr(mine, name)!r}: resuming would change the data order"
                )
