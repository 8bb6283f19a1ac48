"""Simulated devices: exact tensor accounting, enforced memory, enforced speed."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from autobatch.errors import ProbeError
from autobatch.probe.simulated import Pacer, TensorMemory
from autobatch.step.accumulate import Accumulator


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))


def nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_counts_the_model_at_entry_and_each_new_storage_once_until_it_is_freed():
    model = mlp()
    mem = TensorMemory(model=model)
    with mem:
        assert mem.live_bytes == nbytes(model)
        x = torch.zeros(1000)  # 4000 bytes
        view = x.view(10, 100)  # a view: no new storage
        assert mem.live_bytes == nbytes(model) + 4000
        del x, view
        assert mem.live_bytes == nbytes(model)
        y = torch.zeros(250, dtype=torch.float64)
        assert mem.peak_bytes == nbytes(model) + 4000  # the peak stays
        mem.reset_peak()
        assert mem.peak_bytes == mem.live_bytes == nbytes(model) + 2000
        del y


def test_counts_gradients_and_optimizer_state_created_inside_and_alive_at_the_next_entry():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), foreach=True)
    mem = TensorMemory(model=model, optimizer=opt)
    with mem:
        model(torch.randn(8, 32)).sum().backward()
        opt.step()
        after_step = mem.live_bytes  # params + grads + two Adam moments (+ step counters)
    assert after_step >= 4 * nbytes(model)
    with mem:  # a fresh count finds the same tensors alive
        assert mem.live_bytes == after_step


def test_raises_the_cuda_error_type_from_inside_the_op_that_crosses_the_limit():
    model = mlp()
    mem = TensorMemory(nbytes(model) + 10_000, model=model)
    with mem:
        small = torch.zeros(1000)  # 4 kB: fits
        with pytest.raises(torch.OutOfMemoryError, match=r"simulated device out of memory in aten"):
            torch.ones(2000)  # 8 kB more: does not
        assert mem.live_bytes == nbytes(model) + 4000  # the failed op's output is gone
        del small


def test_an_out_of_memory_error_in_backward_reaches_the_caller_as_out_of_memory():
    model = mlp()
    x = torch.randn(512, 32)
    probe = TensorMemory(model=model)
    with probe:
        loss = model(x).sum()
        after_forward = probe.peak_bytes
        loss.backward()
    model.zero_grad(set_to_none=True)
    assert probe.peak_bytes > after_forward
    mem = TensorMemory(after_forward + 1, model=model, extra=[x])
    with mem, pytest.raises(torch.OutOfMemoryError):
        model(x).sum().backward()


def test_a_model_larger_than_the_device_fails_on_entry():
    with pytest.raises(torch.OutOfMemoryError, match="on entry"), TensorMemory(100, model=mlp()):
        pass


def test_the_accumulator_recovers_from_a_simulated_out_of_memory_in_a_no_sync_micro_step():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, opt, agree_on_oom=True)
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="sum")  # noqa: E731
    batches = [(torch.randn(n, 32), torch.randint(0, 4, (n,))) for n in (4, 4000, 4)]
    mem = TensorMemory(nbytes(model) * 3, model=model, optimizer=opt)
    with mem:
        result = acc.step(batches, loss_fn, global_items=4008)
    assert result.oom and result.oom_here and all(p.grad is None for p in model.parameters())
    with mem:  # a smaller plan then runs
        ok = acc.step(batches[:1], loss_fn, global_items=4)
    assert not ok.oom and mem.peak_bytes <= nbytes(model) * 3


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def timed_busy(seconds: float, durations: list[float]) -> None:
    t0 = time.perf_counter()
    busy(seconds)
    durations.append(time.perf_counter() - t0)


@pytest.mark.parametrize("speed", [0.25, 0.5, 1.0])
def test_a_paced_block_takes_one_over_speed_times_as_long(speed):
    pacer, work = Pacer(speed), []
    t0 = time.perf_counter()
    with pacer.micro_step():
        timed_busy(0.02, work)
    total = time.perf_counter() - t0
    # exact against the pacer's own clock, which encloses the work; a loaded machine may
    # pre-empt between the two clocks, so the work is only a lower bound
    assert pacer.timed_s >= work[0]
    assert pacer.slept_s == pytest.approx(pacer.timed_s * (1 / speed - 1), rel=1e-9, abs=1e-12)
    assert total >= work[0] / speed


def test_a_paced_loss_function_sleeps_for_forward_and_backward_before_returning():
    pacer, forward, one = Pacer(0.5, backward_factor=3.0), [], torch.tensor(1.0)
    paced = pacer.wrap_loss_fn(lambda model, batch: timed_busy(0.01, forward) or one)
    t0 = time.perf_counter()
    assert paced(None, None) == 1.0
    assert time.perf_counter() - t0 >= forward[0] * 4  # forward, then forward x 3 x (1/0.5 - 1)
    assert pacer.timed_s >= 3 * forward[0]  # the forward, x backward_factor
    assert pacer.slept_s == pytest.approx(pacer.timed_s, rel=1e-9)  # x (1/0.5 - 1) = x 1


def test_an_attached_pacer_paces_every_optimizer_step_until_detached():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pacer = Pacer(0.5)
    detach = pacer.attach(opt)
    model(torch.randn(2, 32)).sum().backward()
    opt.step()
    assert pacer.slept_s > 0
    slept = pacer.slept_s
    detach()
    opt.step()
    assert pacer.slept_s == slept


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"speed": 2.0}, r"speed=2.0 must be in \(0, 1\].*normalise_speeds"),
        ({"speed": 0.0}, r"speed=0.0 must be in \(0, 1\]"),
        ({"speed": 0.5, "backward_factor": 0.5}, r"backward_factor=0.5 must be >= 1"),
    ],
)
def test_pacer_rejects_speeds_that_would_need_a_negative_delay(kwargs, message):
    with pytest.raises(ProbeError, match=message):
        Pacer(**kwargs)


def test_a_storage_resized_where_no_op_sees_it_is_recounted_after_the_next_op():
    # FSDP2 gathers parameters into storages it resizes itself (`untyped_storage().resize_`)
    gathered = torch.empty(1000)
    gathered.untyped_storage().resize_(0)
    mem = TensorMemory()
    with mem:
        gathered.untyped_storage().resize_(4000)
        torch.ones(1000, out=gathered)  # the copy-out: an out= op
        assert mem.live_bytes == 4000
        gathered.untyped_storage().resize_(0)  # freed after the forward: no op sees it
        one = torch.zeros(1)
        assert mem.live_bytes == one.nbytes == 4
        assert mem.peak_bytes == 4000


FSDP2_PEAKS = r"""
import json, sys, torch, torch.distributed as dist
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.testing._internal.distributed.fake_pg import FakeStore
from autobatch.probe.simulated import TensorMemory
from autobatch.step.shard import Sharded
from autobatch.tasks.tiny_gpt import TinyGPT, TinyGPTConfig, token_loss_sum

cfg = TinyGPTConfig(vocab_size=256, seq_len=32, d_model=64, n_heads=4, n_layers=4)
W, mode, b = json.loads(sys.argv[1])
dist.init_process_group("fake", rank=0, world_size=W, store=FakeStore())
wrapping = Sharded(mode)
model = wrapping.wrap(TinyGPT(cfg), torch.device("cpu"))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
x = torch.randint(0, cfg.vocab_size, (b, cfg.seq_len))

def step(each_micro_step=lambda: None):
    for i in range(2):
        with wrapping.micro_step(model, last=i == 1):
            each_micro_step()
            token_loss_sum(model, {"input_ids": x, "labels": x}).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

step()  # the optimizer's state
tracker = FSDPMemTracker(model, opt)
tracker.track_external(model, opt)
with tracker:
    step(tracker.reset_mod_stats)
mem = TensorMemory(model=model, optimizer=opt, extra=[x])
with mem:
    step()
tracked = sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())
print(json.dumps([tracked, mem.peak_bytes]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", [(3, "full", 4), (3, "optimizer", 4), (2, "full", 1)])
def test_the_peak_of_a_sharded_step_is_fsdp2s_own_trackers(case):
    """Under FSDP2 (a fake process group of W ranks), the same step's peak as torch's
    FSDPMemTracker: gathered parameters freed by resizing their storage leave the count."""
    out = subprocess.run(
        [sys.executable, "-c", FSDP2_PEAKS, json.dumps(case)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    tracked, counted = json.loads(out.stdout.splitlines()[-1])
    assert counted == tracked


def test_the_count_can_be_read_after_the_mode_exits_with_resized_storages_watched():
    gathered = torch.empty(1000)
    mem = TensorMemory()
    with mem:
        torch.ones(1000, out=gathered)
    assert mem.live_bytes == mem.peak_bytes == 4000  # the count as the mode left it
