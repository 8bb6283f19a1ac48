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
from dataclasses import replace

import pytest
import torch
from distributed import run_ranks
from test_sharding import (
    GPT_CFG,
    MAX_GRAD_NORM,
    TOLERANCE,
    Case,
    rel_diff,
    sample_case,
    token_case,
)

from autobatch.errors import PlanError
from autobatch.planning.capacity import DeviceCapacity
from autobatch.planning.memory import MemoryModel
from autobatch.planning.proportional import (
    ADAM_STEP_BYTES,
    peak_bytes,
    proportional_device,
    step_peak_bytes,
)
from autobatch.planning.proportional import units_of as units_of_state
from autobatch.probe.model_state import model_state
from autobatch.probe.peak import PeakLine
from autobatch.probe.simulated import TensorMemory
from autobatch.step.accumulate import Accumulator
from autobatch.step.proportional import (
    Layout,
    Proportional,
    ProportionalModule,
    Slices,
    load_replica,
    replica_optimizer_state,
    state_bytes,
)
from autobatch.tasks.tiny_gpt import TinyGPT, checkpoint_blocks

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

PLAN = [[3, 3], [2, 2], [1, 1]]  # equal counts (2 micro-steps), unequal micro-batches
SHARES = {
    "70/25/5": (0.70, 0.25, 0.05),
    "0/70/30": (0.0, 0.70, 0.30),  # rank 0 (the most samples) holds no state at all
}
STEPS = 3


def recomputed_case(dtype: torch.dtype) -> Case:
    """The token case with each block's forward recomputed inside its backward."""
    case = token_case(dtype)

    def build() -> torch.nn.Module:
        model = token_case(dtype).build_model()
        checkpoint_blocks(model)
        return model

    return Case(build, case.loss_fn, case.batch, case.items)


CASES = {
    ("sample", torch.float64): lambda: sample_case(torch.float64),  # one unit: the root
    ("sample", torch.float32): lambda: sample_case(torch.float32),
    ("token", torch.float64): lambda: token_case(torch.float64),  # the root and 2 blocks
    ("token", torch.float32): lambda: token_case(torch.float32),
    ("recomputed", torch.float64): lambda: recomputed_case(torch.float64),
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
    replica-format checkpoint `resume`, measured by `on_peak` (a PeakProbe); (model,
    optimizer, norms)."""
    model = wrapping.wrap(case.build_model(), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if on_peak is not None:
        on_peak.install(model, optimizer)
    if resume is not None:
        saved = torch.load(resume, weights_only=True)
        if isinstance(model, ProportionalModule):
            load_replica(model, saved["model"], optimizer, saved["optimizer"])
        else:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
    acc = Accumulator(model, optimizer, max_grad_norm=MAX_GRAD_NORM, wrapping=wrapping)
    norms = []
    for j in range(first, first + steps):
        micro_batches, n_items = rank_batches(case, plan, rank, j)
        if on_peak is not None:
            on_peak.step = j
        norms.append(acc.step(micro_batches, case.loss_fn, global_items=n_items).grad_norm)
    return model, optimizer, norms


def rank_batches(case: Case, plan: list[list[int]], rank: int, step: int) -> tuple[list, int]:
    """This rank's micro-batches of global batch `step` under `plan`, and the batch's items."""
    size = sum(map(sum, plan))
    start = step * size + sum(map(sum, plan[:rank]))
    micro_batches = []
    for n in plan[rank]:
        micro_batches.append(case.batch(range(start, start + n)))
        start += n
    return micro_batches, case.items(range(step * size, (step + 1) * size))


def whole(model) -> dict[str, torch.Tensor]:
    if isinstance(model, ProportionalModule):
        return {n: t for n, t in model.full_state_dict().items()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------
# the memory actually held, counted from the tensors


def held_bytes(model: ProportionalModule, optimizer: torch.optim.Optimizer) -> int:
    """The bytes of the distinct storages behind every tensor the sharded state holds: the
    pieces and their gradients, the module's parameters and gradients (views of the units'
    buffers while gathered), the units' buffers and gradients, the optimizer's state."""
    tensors = [*model.unit_buffers, *model.grads]
    for p in [*model.pieces, *model.params]:
        tensors += [p.data, p.grad]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    storages = {}
    for t in tensors:
        if t is not None and t.untyped_storage().nbytes():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


class PeakProbe:
    """Records held_bytes when each unit's gradient is complete (right after its reduce,
    before it is freed: the predicted peak of the largest block) and after each gather."""

    def __init__(self) -> None:
        self.step = 0
        self.at_reduce: list[tuple[int, int, int]] = []  # (step, unit, bytes)
        self.at_gather: list[tuple[int, int]] = []  # (step, bytes)

    def install(self, model: ProportionalModule, optimizer: torch.optim.Optimizer) -> None:
        reduce, gather = model._reduce, model._gather

        def measured_reduce(u: int) -> None:
            reduce(u)
            self.at_reduce.append((self.step, u, held_bytes(model, optimizer)))

        def measured_gather(u: int, *, grads: bool) -> None:
            gather(u, grads=grads)
            self.at_gather.append((self.step, held_bytes(model, optimizer)))

        model._reduce, model._gather = measured_reduce, measured_gather


def memory_main(rank: int, shares: tuple[float, ...]) -> dict:
    case = token_case(torch.float32)
    wrapping = Proportional(shares)
    probe = PeakProbe()
    model = wrapping.wrap(case.build_model(), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    probe.install(model, optimizer)
    acc = Accumulator(model, optimizer, max_grad_norm=MAX_GRAD_NORM, wrapping=wrapping)
    after_step = []
    for j in range(STEPS):
        probe.step = j
        mbs, n_items = rank_batches(case, PLAN, rank, j)
        acc.step(mbs, case.loss_fn, global_items=n_items)
        after_step.append(held_bytes(model, optimizer))
    return {
        "layout": model.layout,
        "at_reduce": probe.at_reduce,
        "at_gather": probe.at_gather,
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
            out["slices"][kind, name] = model.slices.sizes[rank]
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
        "optimizer": replica_optimizer_state(model, optimizer),
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
    ids=["sample-f64", "sample-f32", "token-f64", "token-f32", "recomputed-f64"],
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
    assert sizes[0] == 0 and sum(sizes) == three_ranks[0]["memory"]["0/70/30"]["layout"].total
    sizes = [res["slices"]["token", "70/25/5"] for res in three_ranks]
    total = sum(sizes)
    assert [round(s / total, 2) for s in sizes] == [0.70, 0.25, 0.05]


@pytest.mark.parametrize("shares", list(SHARES))
def test_held_bytes_equal_the_memory_model_on_every_rank(three_ranks, shares):
    """At each unit's reduce a rank holds its state, the root gathered with its gradient and
    that block gathered with its gradient, nothing else (no other block): the largest
    block's is the peak `state_bytes` predicts; between steps, the slice and AdamW."""
    e = 4  # float32
    for rank, res in enumerate(three_ranks):
        mem = res["memory"][shares]
        layout = mem["layout"]
        assert layout.n_units == 3  # the root and two blocks
        root = layout.unit_size(0)
        for step, u, measured in mem["at_reduce"]:
            parts = state_bytes(layout, rank, e, stepped=step > 0)
            state = parts["slice"] + parts["slice_grad"] + parts["optimizer"]
            block = layout.unit_size(u) if u > 0 else 0
            assert measured == state + 2 * (root + block) * e, f"rank {rank}, step {step}"
        for step in range(STEPS):
            peak = sum(state_bytes(layout, rank, e, stepped=step > 0).values())
            reduces = [m for s, _, m in mem["at_reduce"] if s == step]
            gathers = [m for s, m in mem["at_gather"] if s == step]
            assert max(reduces) == peak and max(gathers) <= peak, f"rank {rank}, step {step}"
        between = state_bytes(layout, rank, e)
        for measured in mem["after_step"]:
            assert measured == between["slice"] + between["optimizer"], f"rank {rank}"


# ---------------------------------------------------------------------------
# a block parameter that gets no gradient in a micro-step


class GatedBlock(torch.nn.Module):
    """A block whose `extra` runs only for micro-batches holding a sample whose first input
    feature is over `threshold`, weighted by that mask, so each sample's loss is the same
    whichever micro-batch it is in; where none is, `extra` gets no gradient."""

    def __init__(self, width: int, threshold: float) -> None:
        super().__init__()
        self.lin, self.extra = torch.nn.Linear(width, width), torch.nn.Linear(width, width)
        self.threshold = threshold
        self.runs = {"used": 0, "unused": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.lin(x))
        mask = (x[:, :1] > self.threshold).to(x.dtype)
        used = bool(mask.any())
        self.runs["used" if used else "unused"] += 1
        return y + self.extra(x) * mask if used else y


def gated_case(threshold: float, *, shared: bool = False) -> Case:
    """sample_case's data (float64) through a root and three gated blocks; `shared`: two
    blocks, the first called again after the second, each given its input by keyword."""
    case = sample_case(torch.float64)

    class Gated(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.out = torch.nn.Linear(5, 8), torch.nn.Linear(8, 1)
            n = 2 if shared else 3
            self.blocks = torch.nn.ModuleList(GatedBlock(8, threshold) for _ in range(n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.inp(x)
            if shared:
                for block in (self.blocks[0], self.blocks[1], self.blocks[0]):
                    x = block(x=x)
            else:
                for block in self.blocks:
                    x = block(x)
            return self.out(x)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return Gated().double()

    return Case(build, case.loss_fn, case.batch, case.items)


def gated_main(rank: int, world_size: int) -> dict:
    """Trained with `extra` used on some ranks' micro-steps and not others'; and held bytes
    with `extra` never used (threshold inf)."""
    model, _, _ = train(gated_case(0.0), Proportional(SHARES["70/25/5"]), PLAN, rank)
    runs = [dict(b.runs) for b in model.inner.blocks]
    probe = PeakProbe()
    never, _, _ = train(
        gated_case(float("inf")), Proportional(SHARES["70/25/5"]), PLAN, rank, probe
    )
    shared, _, _ = train(gated_case(0.0, shared=True), Proportional(SHARES["70/25/5"]), PLAN, rank)
    return {
        "trained": whole(model),
        "shared": whole(shared),
        "runs": runs,
        "layout": never.layout,
        "at_gather": probe.at_gather,
    }


def test_a_block_parameter_without_a_gradient_is_reduced_with_its_block():
    """A parameter used on some ranks' micro-steps and not on others' (data decides): every
    rank reduces the block at the same point (when its inputs' gradients are computed), so
    the collectives match and the step equals the full batch's, also for a block called
    twice with its input by keyword; a parameter never used does not keep its block
    gathered past its backward (held bytes at each gather within the peak the memory
    model predicts)."""
    results = run_ranks(gated_main, 3)
    runs = [r for res in results for block in res["runs"] for r in [block]]
    assert sum(r["used"] for r in runs) > 0 and sum(r["unused"] for r in runs) > 0
    reference_model, _, _ = train(gated_case(0.0), Proportional((1.0,)), [[12]], 0)
    # every block's extra runs in every global batch: AdamW sees a gradient for it in
    # every step there too (a parameter with none is skipped, one with a zero one is not)
    assert all(block.runs["unused"] == 0 for block in reference_model.blocks)
    want = whole(reference_model)
    shared_reference, _ = reference(gated_case(0.0, shared=True))
    for rank, res in enumerate(results):
        assert rel_diff(res["trained"], want) <= 1e-10, f"rank {rank}"
        # a block called twice is reduced once, after both calls' backward
        assert rel_diff(res["shared"], shared_reference) <= 1e-10, f"rank {rank}, shared"
        peak = sum(state_bytes(res["layout"], rank, 8).values())
        held = [m for step, m in res["at_gather"] if step > 0]  # AdamW's state born
        assert max(held) <= peak, f"rank {rank}: {max(held)} bytes held at a gather > {peak}"


# ---------------------------------------------------------------------------
# the optimizer step's temporaries (foreach AdamW, CUDA's default; on the CPU by request)


def _step_peaks(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[int]:
    """Each later `optimizer.step()`'s peak of live tensor bytes (the memory counter)."""
    peaks, step = [], optimizer.step

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with TensorMemory(model=model, optimizer=optimizer) as memory:
            out = step(*args, **kwargs)
        peaks.append(memory.peak_bytes)
        return out

    optimizer.step = counted
    return peaks


def deep_case() -> Case:
    """The token case on 8 wider blocks: most of the state in blocks, a small root, so a
    big slice (more than twice the root and a block) outweighs what a micro-step gathers."""
    case = token_case(torch.float32)
    config = replace(GPT_CFG, d_model=32, n_layers=8)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return TinyGPT(config)

    return Case(build, case.loss_fn, case.batch, case.items)


def foreach_main(rank: int, world_size: int, shares: tuple[float, ...]) -> dict:
    case = deep_case()
    wrapping = Proportional(shares)
    model = wrapping.wrap(case.build_model(), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    peaks = _step_peaks(model, optimizer)
    train_steps(case, model, optimizer, wrapping, rank)
    return {"slice": model.layout.slices.sizes[rank], "peak": peaks[-1]}


def train_steps(case: Case, model, optimizer, wrapping, rank: int) -> None:  # noqa: ANN001
    acc = Accumulator(model, optimizer, wrapping=wrapping)
    for j in range(2):  # AdamW's state is born in the first step: the second is the peak
        mbs, n_items = rank_batches(case, PLAN, rank, j)
        acc.step(mbs, case.loss_fn, global_items=n_items)


def test_the_plan_counts_the_foreach_optimizer_steps_temporaries_on_every_rank():
    """foreach AdamW makes one temporary copy of what it steps: on a rank, of its slice,
    which a big slice makes the step's peak, above any micro-step's. The planner takes the
    temporaries per element from a replica's measured step (the probe's optimizer line)
    and predicts each rank's step peak from its slice; the ranks' counted peaks meet it."""
    case = deep_case()
    model = case.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    replica_peaks = _step_peaks(model, optimizer)
    train_steps(case, model, optimizer, Proportional((1.0,)), 0)
    params = [p for p in model.parameters()]
    P = sum(p.numel() for p in params)
    opt_bytes = sum(
        t.untyped_storage().nbytes()
        for st in optimizer.state.values()
        for t in st.values()
        if torch.is_tensor(t)
    )
    state = model_state(model, optimizer_bytes=opt_bytes)
    memory = MemoryModel(
        budget_bytes=2**40,
        micro_lines=(PeakLine(state.total_bytes, 0.0),),
        optimizer_line=PeakLine(replica_peaks[-1], 0.0),
        state=state,
        max_micro_batch=1,
        cap=1,
    )
    device = proportional_device(DeviceCapacity("d", "d", 1, 0.0, 1.0, memory=memory), 3)
    assert device.step_temp_bytes == pytest.approx(4.0, rel=0.05)  # one float32 copy
    units = units_of_state(state)
    shares = (0.9, 0.1, 0.0)
    for rank, res in enumerate(run_ranks(foreach_main, 3, shares)):
        s = res["slice"]
        predicted = step_peak_bytes(device, s, 4, units)
        slack = ADAM_STEP_BYTES * units.count  # AdamW's steps per unit, not per piece
        assert res["peak"] <= predicted <= res["peak"] * 1.01 + slack, (rank, s, res["peak"])
        if rank == 0:  # the big slice: its step, not its micro-steps, decides its peak
            assert peak_bytes(device, 0, s, P, 4, units) == predicted
            no_temps = replace(device, step_temp_bytes=0.0)
            assert peak_bytes(no_temps, 0, s, P, 4, units) < res["peak"]


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


# the layout: units [root 3 | block 4 | block 4] = 11 elements, parameters of 3, 2+2, 4
LAYOUT_PARAMS = ((3, 2, 2, 4), (0, 1, 1, 2))


@pytest.mark.parametrize(
    "sizes, rank, pieces, owners",
    [
        # a rank's range cut at unit boundaries; each unit's parts by owner
        ((5, 6, 0), 0, [(0, 0, 3), (1, 3, 2)], [[(0, 0, 3)], [(0, 3, 5), (1, 5, 7)], [(1, 7, 11)]]),
        ((5, 6, 0), 1, [(1, 5, 2), (2, 7, 4)], None),
        ((5, 6, 0), 2, [], None),  # a rank at 0 owns no piece
        (
            (0, 11, 0),
            1,
            [(0, 0, 3), (1, 3, 4), (2, 7, 4)],
            [[(1, 0, 3)], [(1, 3, 7)], [(1, 7, 11)]],
        ),
        ((3, 1, 7), 1, [(1, 3, 1)], [[(0, 0, 3)], [(1, 3, 4), (2, 4, 7)], [(2, 7, 11)]]),
    ],
)
def test_the_layout_cuts_slices_into_pieces_per_unit(sizes, rank, pieces, owners):
    layout = Layout(*LAYOUT_PARAMS, Slices(sizes))
    assert [(x.unit, x.start, x.size) for x in layout.pieces(rank)] == pieces
    assert sum(x.size for x in layout.pieces(rank)) == sizes[rank]
    if owners is not None:
        assert [layout.owners(u) for u in range(3)] == owners
    assert [layout.unit_bounds(u) for u in range(3)] == [(0, 3), (3, 7), (7, 11)]
    assert layout.gathered_elems() == 3 + 4  # the root and the largest block


def test_state_bytes_count_the_root_and_the_largest_block_gathered():
    layout = Layout((3, 2, 2, 4, 1), (0, 1, 1, 2, 3), Slices((6, 6, 0)))  # blocks of 4, 4, 1
    assert state_bytes(layout, 0, 4) == {
        "slice": 24,
        "slice_grad": 24,
        "optimizer": 48 + 4 * 2,  # two pieces: of the root and of the first block
        "gathered": (3 + 4) * 4,
        "gathered_grads": (3 + 4) * 4,
    }
    assert state_bytes(layout, 2, 4)["optimizer"] == 0  # nothing owned, nothing stepped
    assert state_bytes(layout, 1, 4, stepped=False)["optimizer"] == 0


def test_a_simulated_devices_memory_counter_sees_the_units_freed():
    """TensorMemory (a simulated device's accounting) learns a unit's storage resized to
    0: after a step it counts what the rank holds, not every unit ever gathered (which it
    did before the step made an op see each resize: the bench's 12 MiB device then ran
    out of memory at 73 layers, on the whole model counted)."""
    case = token_case(torch.float32)
    model = case.build_model()
    total = sum(p.numel() for p in model.parameters())
    wrapped = ProportionalModule(model, Slices((total,)))  # one rank, no group
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    wrapping = Proportional((1.0,))
    acc = Accumulator(wrapped, optimizer, max_grad_norm=MAX_GRAD_NORM, wrapping=wrapping)
    memory = TensorMemory(None, model=wrapped, optimizer=optimizer)
    for j in range(2):
        batches = [case.batch(range(j * 6, j * 6 + 3)), case.batch(range(j * 6 + 3, j * 6 + 6))]
        with memory:
            acc.step(batches, case.loss_fn, global_items=case.items(range(j * 6, j * 6 + 6)))
            unseen = memory.live_bytes - held_bytes(wrapped, optimizer)
            # a few small tensors of the step itself aside (< 1 KiB), no unit is counted
            smallest = 4 * min(wrapped.layout.unit_size(u) for u in range(3))
            assert 0 <= unseen < min(1024, smallest)
