"""Simulated devices: exact tensor accounting, enforced memory, enforced speed."""

from __future__ import annotations

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
