"""The accumulator on real gloo ranks: full-batch gradient, one all-reduce per step.

Each world size is spawned once (a module fixture); the ranks run every
scenario in turn and the tests below check one behaviour each.
"""

from __future__ import annotations

import copy

import pytest
import torch
from distributed import run_ranks
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from autobatch.planning.plan import DeviceCapacity
from autobatch.planning.planner import make_plan
from autobatch.planning.sampler import GlobalBatchSampler
from autobatch.step.accumulate import Accumulator
from autobatch.tasks.losses import IGNORE_INDEX
from autobatch.tasks.tiny_gpt import TinyGPT, TinyGPTConfig, token_loss_sum

PLANS = {
    2: [[2, 2, 2, 2], [8]],
    3: [[2, 2, 2, 2], [8], [3, 3, 2]],
}
B = 24  # = the sum of the 3-rank plan; the 2-rank plan uses the first 16

# ---------------------------------------------------------------------------
# data and models, identical on every rank (seeded)


def mlp(dtype: torch.dtype, *, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = (
        [nn.Linear(5, 8)]
        + ([nn.BatchNorm1d(8)] if batchnorm else [])
        + [nn.Tanh(), nn.Linear(8, 1)]
    )
    return nn.Sequential(*layers).to(dtype)


def regression_data(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g).to(dtype), torch.randn(n, 1, generator=g).to(dtype)


def sample_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).sum()


GPT_CFG = TinyGPTConfig(vocab_size=16, seq_len=24, d_model=16, n_heads=2, n_layers=1)


def gpt(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return TinyGPT(GPT_CFG).to(dtype)


def uneven_sequences(n: int) -> list[torch.Tensor]:
    """Lengths from 2 to 24 tokens: very uneven, so micro-batches carry very different
    numbers of target tokens."""
    g = torch.Generator().manual_seed(2)
    lengths = [2 + (i * 7) % 23 for i in range(n)]
    return [torch.randint(0, GPT_CFG.vocab_size, (n_tok,), generator=g) for n_tok in lengths]


def pad(seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of this micro-batch; pads are not targets."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        labels[i, : len(s)] = s
    return {"input_ids": ids, "labels": labels}


def target_tokens(seqs: list[torch.Tensor]) -> int:
    return sum(len(s) - 1 for s in seqs)


def micro_batches(kind: str, dtype: torch.dtype, lo: int, sizes: list[int]) -> list:
    """A rank's micro-batches: its contiguous share [lo, lo+sum(sizes)) of the global batch."""
    out, start = [], lo
    for size in sizes:
        if kind == "sample":
            x, y = regression_data(B, dtype)
            out.append((x[start : start + size], y[start : start + size]))
        else:
            out.append(pad(uneven_sequences(B)[start : start + size]))
        start += size
    return out


def model_and_loss(kind: str, dtype: torch.dtype):
    return (mlp(dtype), sample_loss) if kind == "sample" else (gpt(dtype), token_loss_sum)


def global_items(kind: str, n: int) -> int:
    return n if kind == "sample" else target_tokens(uneven_sequences(B)[:n])


def full_batch_grads(kind: str, dtype: torch.dtype, n: int) -> list[torch.Tensor]:
    """Reference: one process, the whole global batch at once, mean loss per item."""
    model, loss_fn = model_and_loss(kind, dtype)
    (batch,) = micro_batches(kind, dtype, 0, [n])
    (loss_fn(model, batch) / global_items(kind, n)).backward()
    return [p.grad.clone() for p in model.parameters()]


# ---------------------------------------------------------------------------
# what every rank runs


def counting_allreduce(calls, bucket):  # unannotated: DDP checks annotations eagerly
    calls.append(1)
    return default_hooks.allreduce_hook(None, bucket)


def one_step_grads(rank: int, kind: str, dtype: torch.dtype, sizes_by_rank, precision="fp32"):
    """Gradients of one accumulated step, read off an SGD(lr=1) update."""
    model, loss_fn = model_and_loss(kind, dtype)
    ddp = DDP(model, bucket_cap_mb=1000)  # one bucket: one all-reduce per synced backward
    calls: list = []
    ddp.register_comm_hook(calls, counting_allreduce)
    before = [p.detach().clone() for p in model.parameters()]
    acc = Accumulator(ddp, torch.optim.SGD(ddp.parameters(), lr=1.0), precision=precision)
    n = sum(map(sum, sizes_by_rank))
    lo = sum(map(sum, sizes_by_rank[:rank]))
    acc.step(
        micro_batches(kind, dtype, lo, sizes_by_rank[rank]),
        loss_fn,
        global_items=global_items(kind, n),
    )
    grads = [b - p.detach() for b, p in zip(before, model.parameters())]
    return grads, len(calls)


def train_steps(rank: int, world_size: int, steps: int, plan=None) -> list[torch.Tensor]:
    """`steps` AdamW steps on the tiny GPT, token loss, data from the plan sampler."""
    model = gpt(torch.float32)
    wrapped = DDP(model) if world_size > 1 else model
    acc = Accumulator(wrapped, torch.optim.AdamW(wrapped.parameters(), lr=1e-2), max_grad_norm=1.0)
    seqs = uneven_sequences(B)
    sampler = GlobalBatchSampler(len(seqs), 8, seed=3, epoch_end="carry")
    for _ in range(steps):
        mbs = [pad([seqs[i] for i in idx]) for idx in sampler.micro_batches(plan, rank)]
        n = target_tokens([seqs[i] for i in sampler.global_batch()])
        acc.step(mbs, token_loss_sum, global_items=n)
        sampler.advance()
    return [p.detach().clone() for p in model.parameters()]


def hetero_plan():
    devices = [
        DeviceCapacity("a", "big", 8, 0.001, 0.001),
        DeviceCapacity("b", "small", 2, 0.001, 0.002),
        DeviceCapacity("c", "mid", 3, 0.002, 0.001),
    ]
    return make_plan(8, devices)


def single_plan():
    return make_plan(8, [DeviceCapacity("a", "cpu", 3, 0.001, 0.001)])


def buffers_train(rank: int, sizes_by_rank) -> list[torch.Tensor]:
    model = mlp(torch.float32, batchnorm=True)
    ddp = DDP(model)
    acc = Accumulator(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1))
    lo = sum(map(sum, sizes_by_rank[:rank]))
    for _ in range(3):
        mbs = micro_batches("sample", torch.float32, lo, sizes_by_rank[rank])
        acc.step(mbs, sample_loss, global_items=sum(map(sum, sizes_by_rank)))
    return [p.detach().clone() for p in model.parameters()]


def fp16_overflow(rank: int) -> dict:
    """Rank 1 feeds an inf into its second micro-batch: every rank must skip the update."""
    model = mlp(torch.float32)
    ddp = DDP(model)
    acc = Accumulator(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), precision="fp16")
    sizes = PLANS[2]
    lo = sum(map(sum, sizes[:rank]))
    before = [p.detach().clone() for p in model.parameters()]
    scale = acc.scaler.get_scale()
    mbs = micro_batches("sample", torch.float32, lo, sizes[rank])
    if rank == 1:
        x, y = mbs[-1]
        mbs[-1] = (x * float("inf"), y)
    skipped = acc.step(mbs, sample_loss, global_items=16).skipped
    unchanged = all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    clean = micro_batches("sample", torch.float32, lo, sizes[rank])
    second = acc.step(clean, sample_loss, global_items=16)
    moved = not all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    return {
        "skipped": skipped,
        "unchanged": unchanged,
        "scale_before": scale,
        "scale_after": acc.scaler.get_scale(),
        "second_skipped": second.skipped,
        "moved_after_second": moved,
    }


def collectives_of_agreed_steps(rank: int) -> dict:
    """agree_on_oom with a stand-in: the collectives of a clean step, of a step where rank 0
    runs out of memory in its second no_sync micro-step, and the gradient of the retry."""
    import torch.distributed as dist

    model = mlp(torch.float64)
    ddp = DDP(model, bucket_cap_mb=1000)
    ddp.register_comm_hook([], counting_allreduce)  # DDP's all-reduce, through Python
    acc = Accumulator(ddp, torch.optim.SGD(ddp.parameters(), lr=1.0), agree_on_oom=True)
    sizes = PLANS[2]
    lo = sum(map(sum, sizes[:rank]))
    mbs = micro_batches("sample", torch.float64, lo, sizes[rank])
    calls: list[tuple[bool, int]] = []
    real_all_reduce = dist.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        calls.append((bool(kwargs.get("async_op")), tensor.numel()))
        return real_all_reduce(tensor, *args, **kwargs)

    fail = {"at": None, "n": 0}

    def loss(model, batch):
        fail["n"] += 1
        if fail["n"] == fail["at"]:
            raise torch.OutOfMemoryError("injected")
        return sample_loss(model, batch)

    def stand_in():
        return (mbs[-1][0][:1], mbs[-1][1][:1])

    dist.all_reduce = recording_all_reduce
    try:
        clean = acc.step(mbs, loss, global_items=16, oom_stand_in=stand_in)
        clean_calls, calls[:] = list(calls), []
        before = [p.detach().clone() for p in model.parameters()]
        fail.update(at=2 if rank == 0 else None, n=0)
        failed = acc.step(mbs, loss, global_items=16, oom_stand_in=stand_in)
        failed_calls = list(calls)
        unchanged = all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
        fail.update(at=None)
        acc.step(mbs, loss, global_items=16, oom_stand_in=stand_in)
    finally:
        dist.all_reduce = real_all_reduce
    retry_grads = [b - p.detach() for b, p in zip(before, model.parameters())]
    # The ranks count the samples they processed; rank 1 under-reports one (a planted bug).
    n, kept = sum(len(x) for x, _ in mbs), [p.detach().clone() for p in model.parameters()]
    kw = {"global_items": 16, "oom_stand_in": stand_in, "expected_samples": 16}
    short = acc.step(mbs, loss, local_samples=n - rank, **kw)
    untouched = all(torch.equal(k, p) for k, p in zip(kept, model.parameters()))
    counted = acc.step(mbs, loss, local_samples=n, **kw)
    return {
        "short": (short.refused, short.global_samples, untouched),
        "counted": (counted.refused, counted.global_samples),
        "clean_loss": clean.loss,
        "clean_calls": clean_calls,
        "failed": (failed.oom, failed.oom_here),
        "failed_calls": failed_calls,
        "unchanged": unchanged,
        "retry_grads": retry_grads,
    }


def rank_main(rank: int, world_size: int) -> dict:
    sizes = PLANS[world_size]
    out = {"grads": {}, "calls": {}}
    for kind in ("sample", "token"):
        for dtype in (torch.float64, torch.float32):
            grads, calls = one_step_grads(rank, kind, dtype, sizes)
            out["grads"][kind, dtype] = grads
            out["calls"][kind, dtype] = calls
    out["bf16_grads"], _ = one_step_grads(rank, "sample", torch.float32, sizes, "bf16")
    if world_size == 3:
        out["trained"] = train_steps(rank, world_size, 20, hetero_plan())
    if world_size == 2:
        out["buffers"] = buffers_train(rank, sizes)
        out["fp16"] = fp16_overflow(rank)
        out["agreed"] = collectives_of_agreed_steps(rank)
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return 2, run_ranks(rank_main, 2)


@pytest.fixture(scope="module")
def three_ranks():
    return 3, run_ranks(rank_main, 3)


@pytest.fixture(params=["two_ranks", "three_ranks"])
def ranks(request):
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------
# the behaviours

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}


@pytest.mark.parametrize("kind", ["sample", "token"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_ragged_heterogeneous_step_gives_the_full_batch_gradient(ranks, kind, dtype):
    world_size, results = ranks
    n = sum(map(sum, PLANS[world_size]))
    reference = full_batch_grads(kind, dtype, n)
    for r, res in enumerate(results):
        for got, want in zip(res["grads"][kind, dtype], reference):
            diff = (got - want).abs().max().item()
            assert diff <= TOLERANCE[dtype], f"rank {r}: max |diff| {diff:.3g}"


def test_exactly_one_gradient_all_reduce_per_optimizer_step(ranks):
    _, results = ranks
    for res in results:
        assert set(res["calls"].values()) == {1}


def test_bf16_autocast_step_is_close_to_the_full_batch_gradient(ranks):
    world_size, results = ranks
    reference = full_batch_grads("sample", torch.float32, sum(map(sum, PLANS[world_size])))
    for res in results:
        for got, want in zip(res["bf16_grads"], reference):
            assert torch.allclose(got, want, rtol=5e-2, atol=5e-3)


def test_twenty_steps_on_three_mixed_ranks_equal_one_rank(three_ranks):
    _, results = three_ranks
    assert [r.micro_batches for r in hetero_plan().ranks] != [
        r.micro_batches for r in single_plan().ranks
    ]
    reference = train_steps(0, 1, 20, single_plan())
    for got, want in zip(results[0]["trained"], reference):
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel <= 1e-5


def test_model_with_buffers_trains_without_a_collective_mismatch(two_ranks):
    _, results = two_ranks
    # The run finished (no hang) and parameters stay in sync. BatchNorm's
    # statistics depend on the micro-batch (documented), so its gradient is not
    # the full-batch one and is not compared with a reference.
    for a, b in zip(results[0]["buffers"], results[1]["buffers"]):
        assert torch.equal(a, b)


def test_fp16_overflow_on_one_rank_skips_the_update_on_every_rank(two_ranks):
    _, results = two_ranks
    for res in (r["fp16"] for r in results):
        assert res["skipped"] and res["unchanged"]
        assert res["scale_after"] < res["scale_before"]
        assert not res["second_skipped"] and res["moved_after_second"]


def test_oom_agreement_and_loss_ride_one_small_all_reduce_after_the_gradient_one(two_ranks):
    _, results = two_ranks
    # One step: the gradient bucket (DDP's async all-reduce), then one 3-element all-reduce
    # (loss, OOM flag, samples processed) before the optimizer step; nothing before the
    # synced micro-step.
    grad_numel = sum(p.numel() for p in mlp(torch.float64).parameters())
    for res in (r["agreed"] for r in results):
        assert res["clean_calls"] == [(True, grad_numel), (False, 3)]
        assert res["failed_calls"] == [(True, grad_numel), (False, 3)]
    x, y = (t[:16] for t in regression_data(B, torch.float64))
    with torch.no_grad():
        want_loss = float(((mlp(torch.float64)(x) - y) ** 2).sum()) / 16
    assert results[0]["agreed"]["clean_loss"] == pytest.approx(want_loss, rel=1e-12)
    assert results[1]["agreed"]["clean_loss"] == results[0]["agreed"]["clean_loss"]


def test_oom_in_a_no_sync_micro_step_drops_the_step_on_every_rank_and_leaves_no_trace(
    two_ranks,
):
    _, results = two_ranks
    assert [r["agreed"]["failed"] for r in results] == [(True, True), (True, False)]
    assert all(r["agreed"]["unchanged"] for r in results)
    # The retried step is the full-batch gradient at the parameters after the first step.
    model = mlp(torch.float64)
    x, y = (t[:16] for t in regression_data(B, torch.float64))
    (((model(x) - y) ** 2).sum() / 16).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= p.grad
            p.grad = None
    (((model(x) - y) ** 2).sum() / 16).backward()
    for res in (r["agreed"] for r in results):
        for got, p in zip(res["retry_grads"], model.parameters()):
            assert (got - p.grad).abs().max().item() <= 1e-12


def test_plain_module_without_ddp_matches_the_full_batch_gradient():
    model, _ = model_and_loss("token", torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=1.0))
    mbs = micro_batches("token", torch.float64, 0, [5, 5, 4, 1])
    result = acc.step(mbs, token_loss_sum, global_items=global_items("token", 15))
    reference = full_batch_grads("token", torch.float64, 15)
    for b, p, want in zip(before, model.parameters(), reference):
        assert (b - p.detach() - want).abs().max().item() <= 1e-12
    assert result.micro_steps == 4


def test_counting_items_instead_of_giving_them_gives_the_same_step():
    model, _ = model_and_loss("token", torch.float64)
    twin = copy.deepcopy(model)
    mbs = micro_batches("token", torch.float64, 0, [3, 3])
    a = Accumulator(model, torch.optim.SGD(model.parameters(), lr=1.0))
    b = Accumulator(twin, torch.optim.SGD(twin.parameters(), lr=1.0))
    ra = a.step(mbs, token_loss_sum, global_items=global_items("token", 6))
    rb = b.step(
        mbs, token_loss_sum, count_items=lambda mb: int((mb["labels"][:, 1:] != IGNORE_INDEX).sum())
    )
    assert ra.global_items == rb.global_items
    assert ra.loss == pytest.approx(rb.loss)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"precision": "fp8"}, r"precision='fp8' must be one of"),
        ({"max_grad_norm": 0.0}, r"max_grad_norm=0.0 must be > 0"),
    ],
)
def test_bad_accumulator_settings_are_rejected(kwargs, match):
    model = mlp(torch.float32)
    with pytest.raises(ValueError, match=match):
        Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_step_without_micro_batches_or_item_count_is_rejected():
    model = mlp(torch.float32)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="at least one micro-batch"):
        acc.step([], sample_loss, global_items=1)
    with pytest.raises(ValueError, match="give global_items, or count_items"):
        acc.step(micro_batches("sample", torch.float32, 0, [2]), sample_loss)


def test_measured_global_batch_rides_the_same_all_reduce_and_a_short_one_is_refused(two_ranks):
    _, results = two_ranks
    for res in (r["agreed"] for r in results):
        assert res["short"] == (True, 15, True)  # refused on every rank, parameters untouched
        assert res["counted"] == (False, 16)
