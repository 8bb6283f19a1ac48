"""Memory-proportional sharding on real gloo ranks: uneven slices of the flat state give
the full-batch step exactly, and hold exactly the bytes the memory model predicts.

Three ranks are spawned once (a module fixture) and train every scenario through the
Accumulator (AdamW, clipping on in every step) with equal micro-step counts of unequal
micro-batches; the reference is one process, the whole global batch as one micro-batch
(`Proportional.wrap` returns the plain module there). The cases (a per-sample loss on
an MLP, a per-token loss on a tiny GPT) are those of tests/test_sharding.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from distributed import run_ranks
from test_sharding import MAX_GRAD_NORM, TOLERANCE, Case, rel_diff, sample_case, token_case

from autobatch.errors import PlanError
from autobatch.step.accumulate import Accumulator
from autobatch.step.proportional import (
    Proportional,
    ProportionalModule,
    Slices,
    state_bytes,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

PLAN = [[3, 3], [2, 2], [1, 1]]  # equal counts (2 micro-steps), unequal micro-batches
SHARES = {
    "70/25/5": (0.70, 0.25, 0.05),
    "0/70/30": (0.0, 0.70, 0.30),  # rank 0 (the most samples) holds no state at all
}
STEPS = 3
CASES = {
    ("sample", torch.float64): lambda: sample_case(torch.float64),
    ("sample", torch.float32): lambda: sample_case(torch.float32),
    ("token", torch.float64): lambda: token_case(torch.float64),
    ("token", torch.float32): lambda: token_case(torch.float32),
}


def train(
    case: Case,
    wrapping: Proportional,
    plan: list[list[int]],
    rank: int,
    on_peak=None,
    *,
    first: int = 0,
    steps: int = STEPS,
    resume: str | None = None,
):
    """`steps` optimizer steps of global batches first.. on this rank, after loading the
    replica-format checkpoint `resume`; (model, optimizer, norms)."""
    model = wrapping.wrap(case.build_model(), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if resume is not None:
        saved = torch.load(resume, weights_only=True)
        if isinstance(model, ProportionalModule):
            model.load_replica(saved["model"], optimizer, saved["optimizer"])
        else:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
    acc = Accumulator(model, optimizer, max_grad_norm=MAX_GRAD_NORM, wrapping=wrapping)
    size = sum(map(sum, plan))
    norms = []
    for j in range(first, first + steps):
        start = j * size + sum(map(sum, plan[:rank]))
        micro_batches = []
        for n in plan[rank]:
            micro_batches.append(case.batch(range(start, start + n)))
            start += n
        n_items = case.items(range(j * size, (j + 1) * size))
        if on_peak is not None:
            on_peak.step = j
        norms.append(acc.step(micro_batches, case.loss_fn, global_items=n_items).grad_norm)
    return model, optimizer, norms


def whole(model) -> dict[str, torch.Tensor]:
    if isinstance(model, ProportionalModule):
        return {n: t for n, t in model.full_state_dict().items()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------
# the memory actually held, counted from the tensors


def held_bytes(model: ProportionalModule, optimizer: torch.optim.Optimizer) -> int:
    """The bytes of the distinct storages behind every tensor the sharded state holds: the
    slice and its gradient, the module's parameters and gradients (views of the full
    buffers while gathered), the full buffers, the optimizer's state."""
    tensors = [model.slice, model.slice.grad, model.full_params, model.full_grads]
    for p in model.params:
        tensors += [p.data, p.grad]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    storages = {}
    for t in tensors:
        if t is not None and t.untyped_storage().nbytes():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


class PeakProbe:
    """Records held_bytes at the end of every micro-step's reduce (the predicted peak: both
    full buffers and the slice's gradient alive) and after every optimizer step."""

    def __init__(self) -> None:
        self.step = 0
        self.at_reduce: list[tuple[int, int]] = []  # (step, bytes)

    def install(self, model: ProportionalModule, optimizer: torch.optim.Optimizer) -> None:
        reduce = model._reduce

        def measured_reduce() -> None:
            reduce()
            self.at_reduce.append((self.step, held_bytes(model, optimizer)))

        model._reduce = measured_reduce


def memory_main(rank: int, shares: tuple[float, ...]) -> dict:
    case = token_case(torch.float32)
    wrapping = Proportional(shares)
    probe = PeakProbe()
    model = wrapping.wrap(case.build_model(), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    probe.install(model, optimizer)
    acc = Accumulator(model, optimizer, max_grad_norm=MAX_GRAD_NORM, wrapping=wrapping)
    size = sum(map(sum, PLAN))
    after_step = []
    for j in range(STEPS):
        probe.step = j
        start = j * size + sum(map(sum, PLAN[:rank]))
        mbs = []
        for n in PLAN[rank]:
            mbs.append(case.batch(range(start, start + n)))
            start += n
        acc.step(mbs, case.loss_fn, global_items=case.items(range(j * size, (j + 1) * size)))
        after_step.append(held_bytes(model, optimizer))
    return {
        "slice": model.slice.numel(),
        "total": model.total,
        "at_reduce": probe.at_reduce,
        "after_step": after_step,
    }


# ---------------------------------------------------------------------------
# what the ranks run


def three_rank_main(rank: int, world_size: int) -> dict:
    assert world_size == 3
    out: dict = {"trained": {}, "memory": {}, "slices": {}}
    for (kind, dtype), make in CASES.items():
        for name, shares in SHARES.items():
            model, _, norms = train(make(), Proportional(shares), PLAN, rank)
            out["trained"][kind, dtype, name] = (whole(model), norms)
            out["slices"][kind, name] = model.slice.numel()
    for name, shares in SHARES.items():
        out["memory"][name] = memory_main(rank, shares)
    return out


RESUME_PLAN = [[4, 2], [3, 3]]  # two ranks, the same global batch of 12
RESUME_SHARES = (0.2, 0.8)
SAVED_AT, RESUMED_FOR = 2, 2


def save_main(rank: int, world_size: int, path: str) -> None:
    """SAVED_AT steps on 3 ranks with shares 70/25/5; rank 0 writes the replica's format."""
    model, optimizer, _ = train(
        token_case(torch.float64), Proportional(SHARES["70/25/5"]), PLAN, rank, steps=SAVED_AT
    )
    state = {
        "model": model.full_state_dict(),
        "optimizer": model.replica_optimizer_state(optimizer),
    }
    if rank == 0:
        torch.save({**state, "step": SAVED_AT}, path)


def resume_main(rank: int, world_size: int, path: str) -> dict:
    model, _, _ = train(
        token_case(torch.float64),
        Proportional(RESUME_SHARES),
        RESUME_PLAN,
        rank,
        first=SAVED_AT,
        steps=RESUMED_FOR,
        resume=path,
    )
    return whole(model)


def test_checkpoint_of_three_ranks_resumes_on_two_ranks_with_other_shares(tmp_path):
    path = str(tmp_path / "step.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_ranks(save_main, 3, path)
        resumed = run_ranks(resume_main, 2, path)
    case = token_case(torch.float64)
    want = whole(train(case, Proportional((1.0,)), [[12]], 0, steps=SAVED_AT + RESUMED_FOR)[0])
    for rank, got in enumerate(resumed):
        diff = rel_diff(got, want)
        assert diff <= 1e-10, f"rank {rank}: max relative diff {diff:.3g}"
    # the file is a replica's checkpoint: a plain AdamW in one process resumes from it too
    plain = train(
        case, Proportional((1.0,)), [[12]], 0, first=SAVED_AT, steps=RESUMED_FOR, resume=path
    )
    assert rel_diff(whole(plain[0]), want) <= 1e-10


@pytest.fixture(scope="module")
def three_ranks() -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_ranks(three_rank_main, 3)


def reference(case: Case) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One process, no group, the whole global batch as one micro-batch."""
    model, _, norms = train(case, Proportional((1.0,)), [[sum(map(sum, PLAN))]], 0)
    return whole(model), norms


# ---------------------------------------------------------------------------
# the behaviours


@pytest.mark.parametrize("shares", list(SHARES))
@pytest.mark.parametrize(
    "kind, dtype",
    list(CASES),
    ids=["sample-f64", "sample-f32", "token-f64", "token-f32"],
)
def test_uneven_slices_on_three_ranks_equal_the_full_batch_steps(three_ranks, kind, dtype, shares):
    want, want_norms = reference(CASES[kind, dtype]())
    assert min(want_norms) > MAX_GRAD_NORM  # clipping is on in every step
    for rank, res in enumerate(three_ranks):
        got, norms = res["trained"][kind, dtype, shares]
        diff = rel_diff(got, want)
        assert diff <= TOLERANCE[dtype], f"rank {rank}: max relative diff {diff:.3g}"
        # the clipped norm is the global one, not this rank's slice's
        assert norms == pytest.approx(want_norms, rel=TOLERANCE[dtype])


def test_slices_follow_the_shares_and_a_rank_may_own_nothing(three_ranks):
    sizes = [res["slices"]["token", "0/70/30"] for res in three_ranks]
    assert sizes[0] == 0 and sum(sizes) == three_ranks[0]["memory"]["0/70/30"]["total"]
    sizes = [res["slices"]["token", "70/25/5"] for res in three_ranks]
    total = sum(sizes)
    assert [round(s / total, 2) for s in sizes] == [0.70, 0.25, 0.05]


@pytest.mark.parametrize("shares", list(SHARES))
def test_held_bytes_equal_the_memory_model_on_every_rank(three_ranks, shares):
    for rank, res in enumerate(three_ranks):
        mem = res["memory"][shares]
        s, P, e = mem["slice"], mem["total"], 4  # float32
        for step, measured in mem["at_reduce"]:
            predicted = sum(state_bytes(s, P, e, stepped=step > 0).values())
            assert measured == predicted, f"rank {rank}, step {step}"
        between = state_bytes(s, P, e)
        for measured in mem["after_step"]:
            assert measured == between["slice"] + between["optimizer"], f"rank {rank}"


# ---------------------------------------------------------------------------
# pure values and user-facing errors


@pytest.mark.parametrize(
    "total, shares, sizes",
    [
        (100, (0.7, 0.25, 0.05), (70, 25, 5)),  # exact
        (10, (1, 1, 1), (4, 3, 3)),  # the remainder to the lowest rank
        (7, (0, 0.5, 0.5), (0, 4, 3)),  # a rank at 0 keeps 0
        (5, (0.2, 0.8), (1, 4)),
        (3, (1, 0, 0), (3, 0, 0)),  # one rank owns everything
    ],
)
def test_slices_from_shares_sum_to_the_total(total, shares, sizes):
    slices = Slices.from_shares(total, shares)
    assert slices.sizes == sizes and slices.total == total
    assert [slices.bounds(r) for r in range(len(sizes))] == [
        (sum(sizes[:r]), sum(sizes[: r + 1])) for r in range(len(sizes))
    ]


@pytest.mark.parametrize("shares", [(), (0, 0), (0.5, -0.1)])
def test_bad_shares_are_refused(shares):
    with pytest.raises(PlanError, match=r"shares=.* must be >= 0 and not all 0"):
        Proportional(shares)


def test_unequal_micro_step_counts_are_refused():
    Proportional((0.5, 0.5)).check_plan([2, 2])
    with pytest.raises(PlanError, match=r"ranks run \[3, 1\].*equal accumulation"):
        Proportional((0.5, 0.5)).check_plan([3, 1])


def test_one_process_trains_the_plain_module():
    model = sample_case(torch.float32).build_model()
    assert Proportional((1.0,)).wrap(model, torch.device("cpu")) is model
