"""Micro-batches through torch's DataLoader: exactly the sampler's, step by step, resumable.

The oracle is the sampler itself: `GlobalBatchSampler.micro_batches(plan, rank, step)`,
and for variable-length data `pack_global_batch(..., token_budgets(plan, max_len))`.
The loader must give the same index lists, in the same steps, and batches collated
from exactly those indices, inline (num_workers=0) and from worker processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
import pickle

import pytest
import torch
from daemon_util import TINY

from autobatch.errors import LaunchError, SamplerError
from autobatch.planning.packing import pack_global_batch, token_budgets
from autobatch.planning.plan import DeviceCapacity, Plan
from autobatch.planning.planner import make_plan
from autobatch.planning.sampler import GlobalBatchSampler
from autobatch.probe.devices import cpu_device
from autobatch.tasks.loader import (
    MicroBatchSampler,
    StepLoader,
    default_num_workers,
    micro_batch_loader,
)
from autobatch.tasks.task import Task
from launcher.errors import SpecError
from launcher.job.context import RankContext
from launcher.job.spec import parse_spec
from launcher.job.train import _Rank, train_rank

N = 50  # dataset size: 2 global batches of 24 per epoch, 2 samples dropped


def _plan(B: int, limits: list[int], speeds: list[float]) -> Plan:
    devices = [
        DeviceCapacity(f"d{i}", f"G{i}", m, 0.002, 0.001 / s)
        for i, (m, s) in enumerate(zip(limits, speeds))
    ]
    return make_plan(B, devices, keep_all=True)


def _index_task(n: int = N) -> Task:
    """Sample i is the tensor [i, i*i]: a batch says which indices it was collated from."""
    return Task(
        build_model=lambda: torch.nn.Linear(2, 1),
        dataset=[torch.tensor([i, i * i]) for i in range(n)],
        collate=torch.stack,
        loss_fn=lambda model, batch: model(batch.float()).sum(),
    )


def _pad(samples: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(samples, batch_first=True, padding_value=-1)


def _length_task(n: int = N, max_len: int = 16) -> Task:
    """Variable-length sequences (2..max_len tokens) whose first token is their index."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(2, max_len + 1, (n,), generator=g).tolist()
    return Task(
        build_model=lambda: torch.nn.Linear(2, 1),
        dataset=[torch.full((n_,), i) for i, n_ in enumerate(lengths)],
        collate=_pad,
        loss_fn=lambda model, batch: batch.float().sum(),
        sample_length=len,
        worst_case_sample=lambda: torch.zeros(max_len),
    )


PLANS = {
    "1 device, 1 micro-batch": _plan(24, [64], [1.0]),
    "3 mixed, ragged": _plan(24, [4, 16, 2], [1.0, 3.0, 0.5]),
    "4 ranks, small limits": _plan(24, [3, 5, 2, 7], [1.0, 2.0, 1.0, 2.0]),
}

# (plan, epoch_end, first step, num_workers)
CASES = [
    ("1 device, 1 micro-batch", "drop", 0, 0),
    ("3 mixed, ragged", "drop", 0, 0),  # from the start, across two epoch ends
    ("3 mixed, ragged", "drop", 3, 2),  # resumed mid-epoch, from worker processes
    ("4 ranks, small limits", "carry", 1, 0),  # global batches that straddle epochs
    ("4 ranks, small limits", "carry", 5, 2),
]


def _oracle(sampler: GlobalBatchSampler, plan: Plan, rank: int, step: int) -> list[list[int]]:
    return [mb.tolist() for mb in sampler.micro_batches(plan, rank, step)]


@pytest.mark.parametrize(("name", "epoch_end", "start", "workers"), CASES)
def test_every_rank_gets_exactly_the_samplers_micro_batches_step_after_step(
    name, epoch_end, start, workers
):
    plan, task, stop = PLANS[name], _index_task(), start + 5
    oracle = GlobalBatchSampler(N, 24, seed=5, epoch_end=epoch_end)
    per_step: dict[int, list[int]] = {s: [] for s in range(start, stop)}
    for rank in range(plan.world_size):
        sampler = GlobalBatchSampler(N, 24, seed=5, epoch_end=epoch_end, step=start)
        with StepLoader(task, sampler, plan, rank, num_workers=workers, stop=stop) as loader:
            steps = list(loader)
        assert [s.step for s in steps] == list(range(start, stop))
        assert sampler.step == start  # the loader never advances the training's sampler
        for s in steps:
            assert s.indices == _oracle(oracle, plan, rank, s.step)
            for idx, batch in zip(s.indices, s.batches):
                assert batch[:, 0].tolist() == idx  # collated from exactly these samples
            per_step[s.step] += [i for mb in s.indices for i in mb]
    for step, seen in per_step.items():  # invariant 1: the ranks together, the global batch
        assert seen == oracle.global_batch(step).tolist()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("name", ["1 device, 1 micro-batch", "3 mixed, ragged"])
def test_variable_length_data_is_packed_exactly_as_pack_global_batch(name, workers):
    plan, task = PLANS[name], _length_task()
    oracle = GlobalBatchSampler(N, 24, seed=2)
    budgets = token_budgets(plan, 16)
    for rank in range(plan.world_size):
        sampler = GlobalBatchSampler(N, 24, seed=2, step=1)
        with StepLoader(task, sampler, plan, rank, num_workers=workers, stop=4) as loader:
            for s in loader:
                gb = oracle.global_batch(s.step)
                lengths = task.lengths(gb)
                assert s.indices == pack_global_batch(gb, lengths, budgets)[rank]
                mine = [i for mb in s.indices for i in mb]
                assert s.lengths == {i: len(task.dataset[i]) for i in mine}
                for idx, batch in zip(s.indices, s.batches):
                    assert batch[:, 0].tolist() == idx
                    assert batch.shape[1] == max(s.lengths[i] for i in idx)  # padded per mb


def test_a_loader_stopped_mid_run_resumes_at_the_next_step_with_the_same_data():
    plan, task = PLANS["3 mixed, ragged"], _index_task()
    full = list(StepLoader(task, GlobalBatchSampler(N, 24, seed=1), plan, 1, stop=7))
    sampler = GlobalBatchSampler(N, 24, seed=1)
    with StepLoader(task, sampler, plan, 1, num_workers=2, stop=7) as first:
        for _ in range(3):
            next(first)
            sampler.advance()  # the training loop's step, as it would checkpoint it
    resumed = GlobalBatchSampler.from_state(sampler.state().to_dict())
    with StepLoader(task, resumed, plan, 1, num_workers=2, stop=7) as second:
        rest = list(second)
    assert [s.step for s in rest] == [3, 4, 5, 6]
    assert [s.indices for s in rest] == [s.indices for s in full[3:]]


def test_workers_collate_in_other_processes_with_one_torch_thread_and_the_same_batches():
    class Where:
        def __len__(self) -> int:
            return N

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.tensor([i, os.getpid(), torch.get_num_threads()])

    task = Task(lambda: torch.nn.Linear(1, 1), Where(), torch.stack, lambda m, b: b.sum())
    plan = PLANS["3 mixed, ragged"]
    runs = {}
    for workers in (0, 2):
        with StepLoader(
            task, GlobalBatchSampler(N, 24), plan, 0, num_workers=workers, stop=4
        ) as ld:
            runs[workers] = list(ld)
    inline, pooled = runs[0], runs[2]
    assert [s.indices for s in pooled] == [s.indices for s in inline]
    for a, b in zip(inline, pooled):
        for x, y in zip(a.batches, b.batches):
            assert torch.equal(x[:, 0], y[:, 0])
    inline_pids = {int(p) for s in inline for b in s.batches for p in b[:, 1]}
    worker_pids = {int(p) for s in pooled for b in s.batches for p in b[:, 1]}
    assert inline_pids == {os.getpid()}
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids
    assert {int(t) for s in pooled for b in s.batches for t in b[:, 2]} == {1}


def test_close_ends_the_worker_processes_and_the_training_rng_is_untouched():
    rng, others = torch.get_rng_state(), set(multiprocessing.active_children())
    plan = PLANS["3 mixed, ragged"]
    loader = StepLoader(_index_task(), GlobalBatchSampler(N, 24), plan, 0, num_workers=2)
    next(loader)
    assert len(set(multiprocessing.active_children()) - others) == 2
    loader.close()
    assert set(multiprocessing.active_children()) <= others
    assert torch.equal(torch.get_rng_state(), rng)  # a loader draws from its own generator
    with pytest.raises(StopIteration):
        next(loader)


def test_the_batch_sampler_pickles_small_and_works_in_a_plain_dataloader():
    plan = PLANS["3 mixed, ragged"]
    sampler = GlobalBatchSampler(1_000_000, 24, seed=9, step=7)
    mbs = MicroBatchSampler(sampler, plan, 2, stop=9)
    first = [list(mb) for mb in mbs]  # builds the 1M-sample permutation inside
    blob = pickle.dumps(mbs)
    assert len(blob) < 4096  # the permutation cache is not pickled
    copy = pickle.loads(blob)
    assert [list(mb) for mb in copy] == first
    n = plan.ranks[2].accumulation_steps
    tags = [(s, i, n) for s in (7, 8) for i in range(n)]  # each list says where it belongs
    assert [(mb.step, mb.position, mb.count) for mb in copy] == tags
    task = _index_task()
    plain = torch.utils.data.DataLoader(
        task.dataset,
        batch_sampler=MicroBatchSampler(GlobalBatchSampler(N, 24), plan, 2, stop=2),
        collate_fn=task.collate,
    )
    want = [mb for s in range(2) for mb in _oracle(GlobalBatchSampler(N, 24), plan, 2, s)]
    assert [b[:, 0].tolist() for b in plain] == want


def _bad_sampler(**kw):
    args = {"sampler": GlobalBatchSampler(N, 24, step=3), "plan": PLANS["3 mixed, ragged"]}
    args.update(kw)
    return MicroBatchSampler(args.pop("sampler"), args.pop("plan"), **args)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: _bad_sampler(rank=3), r"rank=3 is not a rank of the plan \(0..2\)"),
        (lambda: _bad_sampler(rank=0, plan=_plan(12, [8], [1.0])), "a re-plan must keep"),
        (lambda: _bad_sampler(rank=0, lengths=len), "give lengths and max_len together"),
        (lambda: _bad_sampler(rank=0, stop=2), "stop=2 is before the sampler's step 3"),
        (
            lambda: micro_batch_loader(_index_task(), _bad_sampler(rank=0), num_workers=-1),
            "num_workers=-1 must be >= 0",
        ),
    ],
    ids=["rank", "global batch", "lengths", "stop", "workers"],
)
def test_wrong_arguments_are_errors_that_say_what_is_allowed(make, match):
    with pytest.raises(SamplerError, match=match):
        make()


@pytest.mark.parametrize(
    ("cpus", "ranks", "want"),
    [
        (2, 1, 2),  # this 2-core machine, one rank
        (2, 2, 0),  # a core each: a worker would take the training thread's core
        (2, 3, 0),
        (64, 8, 4),  # capped at 4 per rank
        (12, 4, 3),
        (1, 1, 0),
    ],
)
def test_default_worker_count_shares_the_nodes_cpus_among_its_ranks(cpus, ranks, want):
    assert default_num_workers(ranks, cpus=cpus) == want


@pytest.mark.parametrize(
    ("value", "match"), [(-1, "greater than or equal to 0"), (65, "less than or equal to 64")]
)
def test_data_workers_in_a_job_spec_is_bounded(value, match):
    with pytest.raises(SpecError, match=f"data_workers: Input should be {match}"):
        parse_spec({"name": "t", "global_batch_size": 4, "max_steps": 1, "data_workers": value})


# -- the launcher's rank loop (one rank, no Ray) ------------------------------------------


def _ctx(tmp: pathlib.Path, workers: int, **spec) -> RankContext:
    """A one-rank job of the tiny GPT, planned with micro-batches of 4 (B=12)."""
    plan = make_plan(12, [DeviceCapacity("cpu", "cpu", 4, 0.002, 0.001)])
    fields = {
        "name": "t",
        "task_args": TINY,
        "global_batch_size": 12,
        "max_steps": 4,
        "audit_samples": True,
        "data_workers": workers,
        "checkpoint": {"dir": str(tmp)},
        "seed": 1,
        **spec,
    }
    return RankContext(
        job="t",
        spec=parse_spec(fields),
        precision="fp32",
        plan_json=plan.to_json(),
        rank=0,
        device=cpu_device(),
        node="n",
        checkpoint_dir=str(tmp),
        output_dir=None,
        resume_from=None,
        attempt=0,
    )


def _audit(tmp: pathlib.Path) -> list[dict]:
    """Rank 0's last try of each step (a step retried in place after an OOM is written twice)."""
    lines = (tmp / "samples-rank0.jsonl").read_text().splitlines()
    return list({e["step"]: e for e in map(json.loads, lines)}.values())


def test_the_rank_loop_trains_on_the_same_batches_with_workers_and_after_an_oom_retry(tmp_path):
    oom = [{"kind": "oom", "rank": 0, "step": 2, "micro_step": "first"}]
    outcomes, audits = {}, {}
    for workers in (0, 2):
        d = tmp_path / f"w{workers}"
        outcomes[workers] = train_rank(_ctx(d, workers, faults=oom), lambda snap: None)
        audits[workers] = _audit(d)
    assert audits[0] == audits[2]
    oracle = GlobalBatchSampler(TINY["dataset_size"], 12, seed=1)
    assert [e["step"] for e in audits[2]] == [0, 1, 2, 3]
    for e in audits[2]:  # every step exact, before and after the lowered plan
        assert [i for mb in e["micro_batches"] for i in mb] == oracle.global_batch(
            e["step"]
        ).tolist()
    sizes = [[len(mb) for mb in e["micro_batches"]] for e in audits[2]]
    assert sizes[:2] == [[4, 4, 4]] * 2 and max(sizes[2]) < 4  # the loader was rebuilt
    assert outcomes[2].oom_events == 1
    for name, p in outcomes[0].parameters.items():
        assert torch.equal(p, outcomes[2].parameters[name])


def test_a_short_batch_fault_trains_on_the_trimmed_batch_and_the_step_is_refused(tmp_path):
    others = set(multiprocessing.active_children())  # e.g. another test's daemon parsers
    short = [{"kind": "short_batch", "rank": 0, "step": 1}]
    rank = _Rank(_ctx(tmp_path / "a", 2, faults=short))
    try:
        for _ in range(2):
            indices, batches, _ = rank.share()
            assert [b["input_ids"].shape[0] for b in batches] == [len(mb) for mb in indices]
            rank.sampler.advance()
        assert [len(mb) for mb in indices] == [4, 4, 3]  # step 1: one sample dropped
    finally:
        rank.close_data()
    with pytest.raises(LaunchError, match="step 1: the ranks processed 11 samples"):
        train_rank(_ctx(tmp_path / "b", 2, faults=short), lambda snap: None)
    assert set(multiprocessing.active_children()) <= others  # the failed loop closed its loader
