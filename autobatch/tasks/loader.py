"""A rank's micro-batches through `torch.utils.data.DataLoader`: workers, prefetch, pinned memory.

Collating on the training thread stalls the device whenever samples cost CPU
time (decoding, augmentation, tokenising on the fly). Here the plan still says
which samples each micro-batch holds; DataLoader worker processes only load and
collate them, ahead of time:

* `MicroBatchSampler` is a batch sampler (a torch ``Sampler[list[int]]``) that
  yields this rank's micro-batches, step after step, from the global-batch
  sampler's current step: exactly `GlobalBatchSampler.micro_batches(plan, rank)`,
  or for variable-length data exactly this rank's part of `pack_global_batch`.
  The global batch and its order are the sampler's, so the data stay
  split-invariant (invariant 2 of docs/design.md) and resumable (start from the
  checkpointed step). Each index list carries its step, its place in the step
  and the step's micro-batch count, so the stream describes itself: a plain
  DataLoader with this batch sampler works as well.
* `micro_batch_loader` builds the DataLoader: `task.collate` in `num_workers`
  processes (one torch thread each), `prefetch_factor` micro-batches ahead per
  worker, pinned memory when CUDA is available, persistent workers, and its own
  seeded generator (so making a loader never draws from the training RNG).
* `StepLoader` groups that stream into optimizer steps (`StepBatches`: the
  step's index lists and collated micro-batches, in plan order), which is what
  `Accumulator.step` takes. After a re-plan, close it and build a new one at the
  sampler's current step: what the old one prefetched is dropped.
* `default_num_workers` is a worker count that fits the machine.

Batches from worker processes arrive in shared memory (/dev/shm): in a
container give it room (Docker's default is 64 MB).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Sampler

from autobatch.errors import SamplerError
from autobatch.planning.packing import TokenBudget, pack_global_batch, token_budgets
from autobatch.planning.plan import Plan
from autobatch.planning.sampler import GlobalBatchSampler, SamplerState
from autobatch.tasks.task import Task

LengthsFn = Callable[[Sequence[int]], Sequence[int]]


class MicroBatchIndices(list):
    """One micro-batch's dataset indices (a plain list of ints to anything that iterates it),
    tagged with its optimizer step, its position in that step, the step's micro-batch
    count, and for packed data each sample's length."""

    def __init__(
        self,
        indices: Sequence[int],
        step: int,
        position: int,
        count: int,
        lengths: Sequence[int] | None = None,
    ) -> None:
        super().__init__(int(i) for i in indices)
        self.step, self.position, self.count = step, position, count
        self.lengths = None if lengths is None else tuple(int(n) for n in lengths)


class MicroBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches, step after step, from the global-batch sampler's current step.

    Step j yields `GlobalBatchSampler.micro_batches(plan, rank, j)`, or, when `lengths`
    is given (variable-length data), this rank's micro-batches of
    ``pack_global_batch(global_batch(j), lengths(global_batch(j)), token_budgets(plan,
    max_len))``. It copies the sampler's state (never advances it) and stops before
    step `stop` (None: never). Deterministic, and cheap to pickle: its state is the
    sampler's, the plan, the rank and `lengths` (pickled as it is: a bound method
    pickles its object).
    """

    def __init__(
        self,
        sampler: GlobalBatchSampler | SamplerState,
        plan: Plan,
        rank: int,
        *,
        lengths: LengthsFn | None = None,
        max_len: int | None = None,
        stop: int | None = None,
    ) -> None:
        state = sampler.state() if isinstance(sampler, GlobalBatchSampler) else sampler
        if plan.global_batch_size != state.global_batch_size:
            raise SamplerError(
                f"plan is for global batch {plan.global_batch_size}, sampler for "
                f"{state.global_batch_size}: a re-plan must keep the global batch"
            )
        if not 0 <= rank < plan.world_size:
            raise SamplerError(f"rank={rank} is not a rank of the plan (0..{plan.world_size - 1})")
        if (lengths is None) != (max_len is None):
            raise SamplerError(
                "give lengths and max_len together (variable-length data), or neither"
            )
        if stop is not None and stop < state.step:
            raise SamplerError(f"stop={stop} is before the sampler's step {state.step}")
        self.state, self.plan, self.rank = state, plan, rank
        self.lengths, self.max_len, self.stop = lengths, max_len, stop
        self._budgets: list[TokenBudget] | None = (
            None if max_len is None else token_budgets(plan, max_len)
        )
        self._global: GlobalBatchSampler | None = None

    @property
    def start(self) -> int:
        """The first step this sampler yields: the global-batch sampler's step when copied."""
        return self.state.step

    def micro_batches_at(self, step: int) -> list[MicroBatchIndices]:
        """This rank's micro-batches of global batch `step` (a pure function of the step)."""
        if self._global is None:
            self._global = GlobalBatchSampler.from_state(self.state)
        g = self._global
        if self._budgets is None:
            parts: list = g.micro_batches(self.plan, self.rank, step)
            return [MicroBatchIndices(mb, step, i, len(parts)) for i, mb in enumerate(parts)]
        assert self.lengths is not None
        global_batch = g.global_batch(step)
        lens = [int(n) for n in self.lengths(global_batch)]
        parts = pack_global_batch(global_batch, lens, self._budgets)[self.rank]
        length_of = dict(zip(map(int, global_batch), lens))
        return [
            MicroBatchIndices(mb, step, i, len(parts), [length_of[j] for j in mb])
            for i, mb in enumerate(parts)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while self.stop is None or step < self.stop:
            yield from self.micro_batches_at(step)
            step += 1

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_global"] = None  # its permutation cache: rebuilt on first use
        return state


class MicroBatch(NamedTuple):
    """One collated micro-batch and the indices it was collated from (what the loader yields)."""

    step: int
    position: int  # in the step, from 0
    count: int  # micro-batches in the step
    indices: tuple[int, ...]
    lengths: tuple[int, ...] | None  # packed data: each sample's length
    batch: Any  # task.collate of the samples


class _Tagged:
    """The task's dataset as the loader's workers fetch it: a micro-batch at a time, with
    the tags of its index list kept for the collate."""

    def __init__(self, dataset: Sequence[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, mb: MicroBatchIndices) -> tuple[MicroBatchIndices, list[Any]]:
        if not isinstance(mb, MicroBatchIndices):
            raise SamplerError(
                f"micro_batch_loader needs a MicroBatchSampler's index lists, got "
                f"{type(mb).__name__}"
            )
        many = getattr(self.dataset, "__getitems__", None)
        samples = many(list(mb)) if many else [self.dataset[i] for i in mb]
        return mb, list(samples)


@dataclass(frozen=True)
class _Collate:
    collate: Callable[[list[Any]], Any]

    def __call__(self, fetched: tuple[MicroBatchIndices, list[Any]]) -> MicroBatch:
        mb, samples = fetched
        return MicroBatch(
            mb.step, mb.position, mb.count, tuple(mb), mb.lengths, self.collate(samples)
        )


def _one_torch_thread(worker_id: int) -> None:
    """Worker processes collate with one torch thread each: N workers on N cores, not N^2."""
    torch.set_num_threads(1)


def micro_batch_loader(
    task: Task,
    batch_sampler: MicroBatchSampler,
    *,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    pin_memory: bool | None = None,
    seed: int | None = None,
    multiprocessing_context: Any = None,
) -> DataLoader:
    """A DataLoader yielding `MicroBatch`es (indices and `task.collate` of their samples) in
    the batch sampler's order.

    `num_workers` 0 collates on the calling thread. With workers, each keeps
    `prefetch_factor` micro-batches in flight and stays alive between iterations
    (persistent). `pin_memory` defaults to whether CUDA is available. `seed` seeds the
    loader's own generator (default: from the sampler's seed and the rank), so
    building a loader leaves the training RNG untouched.
    """
    if num_workers < 0:
        raise SamplerError(f"num_workers={num_workers} must be >= 0 (0: collate inline)")
    if prefetch_factor < 1:
        raise SamplerError(f"prefetch_factor={prefetch_factor} must be >= 1")
    if seed is None:
        seed = batch_sampler.state.seed * 1_000_003 + batch_sampler.rank
    workers = num_workers > 0
    return DataLoader(
        _Tagged(task.dataset),  # type: ignore[arg-type]  # a map-style dataset
        batch_sampler=batch_sampler,
        collate_fn=_Collate(task.collate),
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if workers else None,
        persistent_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=_one_torch_thread if workers else None,
        generator=torch.Generator().manual_seed(seed),
        multiprocessing_context=multiprocessing_context if workers else None,
    )


@dataclass(frozen=True)
class StepBatches:
    """One optimizer step of this rank: its micro-batches' indices and collated batches."""

    step: int
    indices: list[list[int]]
    batches: list[Any]
    lengths: dict[int, int] | None  # packed data: the length of each of this rank's samples


class StepLoader:
    """Per optimizer step, this rank's micro-batches from DataLoader workers (an iterator).

    Starts at the sampler's current step (so a resumed sampler resumes the data) and
    never advances the sampler itself. For tasks with `sample_length` the micro-batches
    are packed by tokens (`max_len`: the task's `max_length()` unless given). `close()`
    ends the worker processes; after a re-plan build a new loader at the sampler's step.
    """

    def __init__(
        self,
        task: Task,
        sampler: GlobalBatchSampler,
        plan: Plan,
        rank: int,
        *,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        pin_memory: bool | None = None,
        stop: int | None = None,
        max_len: int | None = None,
        multiprocessing_context: Any = None,
    ) -> None:
        packed = task.sample_length is not None
        if packed and max_len is None:
            max_len = task.max_length()
        self.batch_sampler = MicroBatchSampler(
            sampler,
            plan,
            rank,
            lengths=task.lengths if packed else None,
            max_len=max_len if packed else None,
            stop=stop,
        )
        self.loader: DataLoader | None = micro_batch_loader(
            task,
            self.batch_sampler,
            num_workers=num_workers,
            prefetch_factor=prefetch_factor,
            pin_memory=pin_memory,
            multiprocessing_context=multiprocessing_context,
        )
        self.step = self.batch_sampler.start  # the step the next __next__ returns
        self._it: Iterator[MicroBatch] | None = None

    def __iter__(self) -> StepLoader:
        return self

    def __next__(self) -> StepBatches:
        if self.loader is None:
            raise StopIteration
        if self._it is None:
            self._it = iter(self.loader)
        step = self.step
        first = next(self._it)  # StopIteration at `stop`
        got = [first]
        while len(got) < first.count:
            try:
                got.append(next(self._it))
            except StopIteration:
                raise SamplerError(f"the loader ended inside step {step}") from None
        for pos, mb in enumerate(got):  # an internal invariant: the stream is the sampler's
            if (mb.step, mb.position, mb.count) != (step, pos, first.count):
                raise SamplerError(
                    f"step {step}: expected micro-batch {pos} of {first.count}, the loader "
                    f"gave {mb.position} of {mb.count} of step {mb.step}"
                )
        self.step += 1
        lengths = None
        if first.lengths is not None:
            lengths = {i: n for mb in got for i, n in zip(mb.indices, mb.lengths or ())}
        return StepBatches(
            step, [list(mb.indices) for mb in got], [mb.batch for mb in got], lengths
        )

    def close(self) -> None:
        """End the worker processes; prefetched micro-batches are dropped."""
        # The iterator (also held by the loader, with persistent workers) shuts its
        # workers down when the last reference goes.
        self._it = None
        self.loader = None

    def __enter__(self) -> StepLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_num_workers(ranks_on_node: int = 1, cpus: int | None = None) -> int:
    """DataLoader workers per rank that fit the machine: the node's CPUs (this process's
    affinity unless `cpus` is given) shared among its ranks, at most 4 per rank; 0 when a
    rank would get fewer than 2 CPUs (a worker would take the training thread's core)."""
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
    per_rank = cpus // max(1, ranks_on_node)
    return 0 if per_rank < 2 else min(4, per_rank)
