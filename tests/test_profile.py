"""The model profile on CPU and simulated devices: fit, verification, OOM recovery, cache,
and the time per micro-step (warm shapes, medians, a line that says when it is not trusted)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from autobatch.errors import NoFitError, ProbeError
from autobatch.planning.planner import make_plan
from autobatch.planning.proportional import proportional_device
from autobatch.probe import budget, measure
from autobatch.probe.devices import SimulatedDevice, cpu_device, host_stand_in
from autobatch.probe.measure import StepRunner
from autobatch.probe.model_state import meta_model_state
from autobatch.probe.peak import PeakLine, largest_under
from autobatch.probe.profile import (
    MAX_MEASURED_STEPS,
    ModelProfile,
    check_backend,
    profile_model,
)
from autobatch.probe.time_fit import fit_time_line
from autobatch.tasks.task import Task
from autobatch.tasks.tiny_gpt import tiny_gpt_task

MiB = 2**20


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)


def mlp_task(width: int = 256) -> Task:
    """Wide layers, small inputs: parameters and Adam state outweigh activations at small b."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, generator=g), int(i % 10)) for i in range(32)]
    return Task(
        build_model=lambda: nn.Sequential(
            nn.Linear(64, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, 10),
        ),
        dataset=data,
        collate=lambda items: (
            torch.stack([x for x, _ in items]),
            torch.tensor([y for _, y in items]),
        ),
        loss_fn=lambda model, b: F.cross_entropy(model(b[0]), b[1], reduction="sum"),
    )


def contrastive_task() -> Task:
    """A CLIP-style loss over all pairs: a b x b matrix, so peak(b) is not linear in b."""
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(32, generator=g) for _ in range(16)]

    def loss_fn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        z = model(x)
        logits = (z @ z.T).repeat(1, 64)  # b x 64b similarities
        return F.cross_entropy(logits, torch.arange(len(x)), reduction="sum")

    return Task(lambda: nn.Linear(32, 32), data, torch.stack, loss_fn)


TASKS = {"mlp": mlp_task, "tiny_gpt": lambda: tiny_gpt_task(dataset_size=16)}


def fresh_peak(task: Task, b: int) -> int:
    """A step's peak measured by its own runner (steady state: the second step)."""
    runner = StepRunner(task, cpu_device(), make_optimizer=adamw)
    runner.run(1)
    return runner.run(b).peak_bytes


def true_max(task: Task, budget: int, fits_at: int) -> int:
    """The largest micro-batch whose step peak is within budget, by brute force."""
    runner = StepRunner(task, cpu_device(), make_optimizer=adamw)
    runner.run(1)

    def fits(b: int) -> bool:
        return runner.run(b).peak_bytes <= budget

    assert fits(fits_at)
    lo, hi = fits_at, fits_at + 1
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@pytest.mark.parametrize(
    ("task_name", "memory_mib", "least_share"),
    [
        ("tiny_gpt", 3, 1.0),  # peak(b) is linear: the exact largest size
        ("tiny_gpt", 12, 1.0),
        ("mlp", 12, 1.0),  # the peak bends upwards near b=240, well before the largest size
        ("mlp", 3, 2 / 3),  # ... just before it: the bend is past the last measured size
    ],
)
def test_the_chosen_micro_batch_fits_was_predicted_within_2pct_and_is_the_largest(
    task_name, memory_mib, least_share
):
    task = TASKS[task_name]()
    device = SimulatedDevice("sim", memory_mib * MiB)
    p = profile_model(task, device, make_optimizer=adamw, headroom_fraction=0.02)
    m = p.measurement_at(p.max_micro_batch)
    assert p.verified and m is not None and m.peak_bytes <= p.budget_bytes
    assert m.predicted_peak_bytes is not None, "the chosen size must come from the fit"
    assert abs(m.predicted_peak_bytes - m.peak_bytes) <= 0.02 * m.peak_bytes
    assert p.peak_bytes(p.max_micro_batch) == pytest.approx(m.peak_bytes, rel=0.02)
    best = true_max(task, p.budget_bytes, p.max_micro_batch)  # an independent runner
    assert least_share * best <= p.max_micro_batch <= best
    assert 1 <= p.measured_steps == len(p.measurements) <= MAX_MEASURED_STEPS


def test_with_foreach_adamw_the_optimizer_step_sets_the_peak_at_small_batches():
    task, device = mlp_task(width=512), SimulatedDevice("sim", 32 * MiB)
    p = profile_model(task, device, make_optimizer=adamw)
    first, second = p.measurements[:2]
    chosen = p.measurement_at(p.max_micro_batch)
    assert first.optimizer_peak_bytes > first.micro_peak_bytes  # the optimizer sets it at b=1
    assert second.optimizer_peak_bytes > second.micro_peak_bytes  # ... and at b2
    assert chosen.micro_peak_bytes > chosen.optimizer_peak_bytes  # activations at the end
    assert p.peak_bytes(1) == first.peak_bytes
    # one line through the first two steps' peaks would promise far more than fits
    naive = PeakLine.through((1, first.peak_bytes), (second.micro_batch, second.peak_bytes))
    assert naive.largest_under(p.budget_bytes, 10**6) > 2 * p.max_micro_batch
    # the max of lines never under-states the peak inside the measured range
    for b in (second.micro_batch * 2, p.max_micro_batch // 2):
        assert p.peak_bytes(b) >= fresh_peak(task, b)


@pytest.mark.parametrize("memory_mib", [2.5, 4, 9, 30])
def test_never_more_than_four_measured_steps_per_device(memory_mib):
    p = profile_model(
        tiny_gpt_task(dataset_size=16),
        SimulatedDevice("sim", int(memory_mib * MiB)),
        make_optimizer=adamw,
    )
    assert p.measured_steps <= MAX_MEASURED_STEPS and p.max_micro_batch >= 1


def test_an_out_of_memory_at_verification_steps_down_to_a_measured_size_that_fits():
    # peak(b) grows like b^2 here: the line through the first two sizes over-promises
    task = contrastive_task()
    p = profile_model(
        task, SimulatedDevice("sim", 2 * MiB), make_optimizer=adamw, headroom_fraction=0
    )
    assert any(m.oom for m in p.measurements), "the line must have over-promised once"
    assert p.measured_steps <= MAX_MEASURED_STEPS and p.verified
    chosen = p.measurement_at(p.max_micro_batch)
    assert chosen is not None and chosen.peak_bytes <= 2 * MiB
    assert all(m.micro_batch > p.max_micro_batch for m in p.measurements if m.oom)


def test_a_runner_recovers_cleanly_from_an_out_of_memory_step():
    task = tiny_gpt_task(dataset_size=16)
    runner = StepRunner(task, SimulatedDevice("sim", 4 * MiB).info(), make_optimizer=adamw)
    runner.run(1)
    before = runner.run(2)
    assert runner.run(64).oom
    assert all(p.grad is None for p in runner.model.parameters())
    after = runner.run(2)  # nothing of the failed step is left alive
    assert after.micro_peak_bytes == before.micro_peak_bytes
    assert after.optimizer_peak_bytes == before.optimizer_peak_bytes


def test_a_cache_hit_skips_the_measurement(tmp_path):
    calls = []
    base = tiny_gpt_task(dataset_size=16)
    task = Task(
        base.build_model,
        base.dataset,
        base.collate,
        lambda model, batch: calls.append(1) or base.loss_fn(model, batch),
    )
    device = SimulatedDevice("sim", 8 * MiB)
    first = profile_model(task, device, make_optimizer=adamw, cache_dir=tmp_path)
    assert not first.cached and calls
    calls.clear()
    second = profile_model(task, device, make_optimizer=adamw, cache_dir=tmp_path)
    assert calls == [] and second.cached and second.measured_steps == 0
    assert (second.max_micro_batch, second.verified) == (first.max_micro_batch, True)
    assert second.peak_lines == first.peak_lines and second.cache_key == first.cache_key
    # more headroom, same key: the largest size is re-derived from the fit, unmeasured
    tight = profile_model(
        task, device, make_optimizer=adamw, cache_dir=tmp_path, headroom_fraction=0.4
    )
    assert calls == [] and tight.cached and not tight.verified
    assert tight.max_micro_batch == largest_under(tight.peak_lines, tight.budget_bytes, 4096)
    assert tight.max_micro_batch < first.max_micro_batch


def test_the_search_never_measures_past_its_cap_and_verifies_the_cap_when_it_fits():
    device = SimulatedDevice("sim", 30 * MiB)
    free = profile_model(tiny_gpt_task(dataset_size=16), device, make_optimizer=adamw)
    assert free.max_micro_batch > 24, "the device must fit more than the cap"
    capped = profile_model(
        tiny_gpt_task(dataset_size=16), device, make_optimizer=adamw, max_micro_batch=24
    )
    assert max(m.micro_batch for m in capped.measurements) == 24
    assert (capped.max_micro_batch, capped.verified, capped.micro_batch_cap) == (24, True, 24)
    assert capped.measured_steps < free.measured_steps


def test_a_jobs_probe_is_capped_at_its_global_batch():
    from launcher.job.spec import JobSpec
    from launcher.job.worker import probe

    spec = JobSpec.model_validate(
        {
            "name": "cap",
            "task_args": {"dataset_size": 16},
            "global_batch_size": 6,
            "max_steps": 1,
            "devices": {"select": "simulated", "simulated": [{"name": "s", "memory": "30MiB"}]},
        }
    )
    p = probe(spec, "fp32", SimulatedDevice("sim", 30 * MiB).info(), None)
    assert p.micro_batch_cap == 6 and p.max_micro_batch == 6
    assert max(m.micro_batch for m in p.measurements) == 6


@pytest.mark.parametrize(
    "change",
    [
        {"precision": "bf16"},  # precision
        {"make_optimizer": lambda m: torch.optim.AdamW(m.parameters(), foreach=False)},  # flags
        {"make_optimizer": lambda m: torch.optim.SGD(m.parameters(), lr=0.1)},  # optimizer
        {"device": SimulatedDevice("sim", 9 * MiB)},  # device type
        {  # the longest sequence the job allows
            "task": replace(
                tiny_gpt_task(dataset_size=16),
                worst_case_sample=lambda: torch.zeros(16, dtype=torch.long),
            )
        },
        {"max_micro_batch": 24},  # the search's cap: nothing above it was measured
    ],
    ids=["precision", "optimizer-flags", "optimizer", "device", "sequence-length", "cap"],
)
def test_what_changes_a_profile_changes_its_cache_key(tmp_path, change):
    args = {
        "task": tiny_gpt_task(dataset_size=16),
        "device": SimulatedDevice("sim", 8 * MiB),
        "make_optimizer": adamw,
        "precision": "fp32",
    }
    first = profile_model(cache_dir=tmp_path, **args)
    other = profile_model(cache_dir=tmp_path, **{**args, **change})
    assert not other.cached and other.cache_key != first.cache_key


def test_profile_round_trips_through_json_and_feeds_the_planner():
    p = profile_model(mlp_task(), SimulatedDevice("sim", 8 * MiB, 0.5), make_optimizer=adamw)
    again = ModelProfile.from_json(p.to_json())
    assert again == p and json.loads(p.to_json())["simulated"] is True
    cap = p.capacity("r0")
    assert cap.simulated and cap.max_micro_batch == p.max_micro_batch
    for b in range(1, p.max_micro_batch + 1):  # the planner's line never under-states the peak
        assert cap.predicted_peak_bytes(b) >= p.peak_bytes(b)
    assert cap.per_sample_s >= 0 and cap.fixed_s + cap.per_sample_s > 0
    assert 1 <= p.backward_factor < 10
    plan = make_plan(3 * p.max_micro_batch + 1, [cap])
    assert plan.ranks[0].micro_batches and max(plan.ranks[0].micro_batches) <= p.max_micro_batch


def test_a_simulated_device_runs_its_steps_at_its_speed():
    task = mlp_task()
    slow = StepRunner(task, SimulatedDevice("slow", 64 * MiB, 0.25).info(), make_optimizer=adamw)
    m = [slow.run(8) for _ in range(2)][-1]
    assert slow.pacer is not None and slow.pacer.slept_s > 0
    # the micro-step it reports is the paced one: 4x what the machine took
    assert m.micro_step_s >= 3 * m.forward_s


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": SimulatedDevice("sim", 200 * 1024)}, r"sim: one sample does not fit"),
        ({"precision": "fp8"}, r"precision='fp8' must be one of"),
        ({"headroom_fraction": 1.0}, r"headroom_fraction=1.0 must be in \[0, 1\)"),
        ({"max_micro_batch": 0}, r"max_micro_batch=0 must be >= 1"),
        ({"extra_reserve_bytes": -1}, r"extra_reserve_bytes=-1 must be >= 0"),
    ],
)
def test_profile_errors(kwargs, message):
    args = {"device": SimulatedDevice("sim", 8 * MiB), **kwargs}
    with pytest.raises(ProbeError, match=message):
        profile_model(tiny_gpt_task(dataset_size=16), make_optimizer=adamw, **args)


def test_bf16_on_a_device_without_it_and_an_invisible_gpu_are_refused():
    turing = replace(cpu_device(), name="Tesla T4", bf16_supported=False, compute_capability=(7, 5))
    with pytest.raises(ProbeError, match=r"Tesla T4 has no bf16 \(compute capability \(7, 5\)"):
        profile_model(mlp_task(), turing, make_optimizer=adamw, precision="bf16")
    hidden = replace(cpu_device(), torch_device=None, uuid="GPU-x")
    with pytest.raises(ProbeError, match=r"is not visible to this process"):
        profile_model(mlp_task(), hidden, make_optimizer=adamw)


@pytest.mark.parametrize(
    ("kwargs", "reserved"),
    [
        ({"backend": "gloo"}, {"ddp_gradient_buckets"}),  # gloo's buffers are in host memory
        ({"backend": "nccl"}, {"ddp_gradient_buckets", "nccl_buffers"}),
    ],
)
def test_the_process_group_reserves_what_its_backend_holds(kwargs, reserved, monkeypatch):
    monkeypatch.setattr(budget, "NCCL_RESERVE_BYTES", 2 * MiB)  # 256 MiB: more than "sim"
    task, device = mlp_task(), SimulatedDevice("sim", 16 * MiB)
    alone = profile_model(task, device, make_optimizer=adamw)
    ddp = profile_model(task, device, make_optimizer=adamw, **kwargs)
    grads = sum(p.numel() * 4 for p in task.build_model().parameters())
    expected = {"ddp_gradient_buckets": grads, "nccl_buffers": 2 * MiB}
    assert alone.reserve == ()
    assert dict(ddp.reserve) == {k: expected[k] for k in reserved}
    assert ddp.budget_bytes == alone.budget_bytes - sum(expected[k] for k in reserved)
    assert ddp.max_micro_batch < alone.max_micro_batch


def test_an_unknown_backend_is_refused_naming_the_choices():
    assert check_backend(None) is None and check_backend("gloo") == "gloo"
    with pytest.raises(
        ProbeError, match=r"backend='mpi' must be one of \('nccl', 'gloo'\) or None"
    ):
        profile_model(
            mlp_task(), SimulatedDevice("sim", 16 * MiB), make_optimizer=adamw, backend="mpi"
        )


def test_gradient_checkpointing_is_turned_on_where_one_sample_does_not_fit_without_it():
    task = tiny_gpt_task(dataset_size=8, seq_len=256, d_model=32, n_heads=2, n_layers=6)
    big = SimulatedDevice("big", 512 * MiB)
    small = {"make_optimizer": adamw, "headroom_fraction": 0, "max_micro_batch": 4}
    plain = profile_model(task, big, **small)
    checkpointed = profile_model(task, big, **small, gradient_checkpointing=True)
    need_plain, need_checkpointed = plain.peak_bytes(1), checkpointed.peak_bytes(1)
    assert need_checkpointed < 0.8 * need_plain  # six blocks' activations are not kept
    between = SimulatedDevice("between", (need_plain + need_checkpointed) // 2)
    with pytest.raises(NoFitError):
        profile_model(task, between, **small)
    auto = profile_model(task, between, **small, gradient_checkpointing=None)
    assert auto.gradient_checkpointing and auto.max_micro_batch >= 1
    assert auto.capacity("d0").gradient_checkpointing
    roomy = profile_model(task, big, **small, gradient_checkpointing=None)
    assert not roomy.gradient_checkpointing


# ---------------------------------------------------------------------------
# the model's state, for sharding


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _real_optimizer_state(task: Task, make_optimizer) -> int:
    """The optimizer's device tensors after one real step (not the host step counters)."""
    model = task.build_model()
    opt = make_optimizer(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    return _bytes(v for s in opt.state.values() for v in s.values() if v.dim() > 0)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        adamw,  # two moments per parameter
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),  # one buffer
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),  # none
        lambda m: torch.optim.Adagrad(m.parameters()),
    ],
    ids=["adamw", "sgd-momentum", "sgd", "adagrad"],
)
def test_the_state_counts_parameters_gradients_and_the_optimizers_state(make_optimizer):
    task = tiny_gpt_task(dataset_size=16)
    state = meta_model_state(task, make_optimizer)
    model = task.build_model()
    assert state.params_bytes == state.grads_bytes == _bytes(model.parameters())
    assert state.optimizer_bytes == _real_optimizer_state(task, make_optimizer)
    # the units: the transformer's blocks; the embeddings, final norm and head are the root's
    assert state.largest_unit_bytes == _bytes(model.blocks[0].parameters())
    assert state.root_unit_bytes == state.params_bytes - _bytes(model.blocks.parameters())


def test_frozen_parameters_have_no_gradients_and_no_optimizer_state():
    base = mlp_task()

    def build() -> nn.Module:
        model = base.build_model()
        model[0].requires_grad_(False)  # e.g. a frozen base under an adapter
        return model

    task = replace(base, build_model=build)
    state = meta_model_state(task, adamw)
    frozen = _bytes(build()[0].parameters())
    assert state.grads_bytes == state.params_bytes - frozen
    assert state.optimizer_bytes == 2 * state.grads_bytes
    assert (state.largest_unit_bytes, state.root_unit_bytes) == (0, state.params_bytes)  # no blocks


def test_an_optimizer_that_cannot_step_on_meta_is_counted_on_the_measured_model():
    fused = lambda m: torch.optim.AdamW(m.parameters(), fused=True)  # noqa: E731  no meta kernel
    task = tiny_gpt_task(dataset_size=16)
    assert meta_model_state(task, fused) is None
    p = profile_model(task, SimulatedDevice("sim", 8 * MiB), make_optimizer=fused)
    assert p.state is not None and p.state.optimizer_bytes >= 2 * p.state.params_bytes


def test_a_profile_plans_a_sharded_model_over_any_world_size():
    task, device = tiny_gpt_task(dataset_size=16), SimulatedDevice("sim", 6 * MiB)
    p = profile_model(task, device, make_optimizer=adamw, backend="gloo")
    replica = p.capacity("r0")
    assert (replica.sharding, replica.max_micro_batch) == ("none", p.max_micro_batch)
    mem = replica.memory
    assert mem.budget("full") == p.budget_bytes + dict(p.reserve)["ddp_gradient_buckets"]
    assert mem.peak_bytes(3) == p.peak_bytes(3)  # "none" is the profile's own peak(b)
    full = p.capacity("r0", sharding="full", world_size=4)
    assert (full.sharding, full.world_size) == ("full", 4)
    assert p.max_micro_batch < full.max_micro_batch <= mem.cap
    assert full.state_bytes() < replica.state_bytes() == p.state.total_bytes
    plan = make_plan(64, [full, replace(full, device_id="r1")], sharding="full")
    assert plan.world_size == 2 and len({r.accumulation_steps for r in plan.ranks}) == 1


def test_a_profile_carried_to_another_device_takes_its_memory_speed_and_extra_reserve():
    task = tiny_gpt_task(dataset_size=16)
    p = profile_model(task, SimulatedDevice("sim", 6 * MiB), make_optimizer=adamw)
    small = SimulatedDevice("small", 2 * MiB, 0.25).info()
    extra = (("gpu_overhead", 100 * 1024),)
    plain = p.carried_to(small, headroom_fraction=0.1, time_scale=4.0)
    more = p.carried_to(small, headroom_fraction=0.1, time_scale=4.0, extra_reserve=extra)
    assert plain.budget_bytes == 2 * MiB - int(0.1 * 2 * MiB) - p.reserve_bytes
    assert more.budget_bytes == plain.budget_bytes - 100 * 1024
    assert dict(more.reserve)["gpu_overhead"] == 100 * 1024 and more.estimated
    assert plain.per_sample_s == 4.0 * p.per_sample_s and plain.state == p.state
    assert more.max_micro_batch <= plain.max_micro_batch < p.max_micro_batch


def test_a_carried_profile_raises_the_optimizer_step_by_what_the_target_adds():
    """Carried from a CPU to a GPU, the optimizer step takes one more copy of the trainable
    parameters (foreach AdamW): the step's line, the replica's limit and the proportional
    planner's temporaries per element all see it."""
    task = tiny_gpt_task(dataset_size=16)
    p = profile_model(task, SimulatedDevice("sim", 6 * MiB), make_optimizer=adamw)
    target = SimulatedDevice("target", 6 * MiB).info()
    extra = p.state.grads_bytes
    plain = p.carried_to(target, headroom_fraction=0.05, time_scale=1.0)
    more = p.carried_to(target, headroom_fraction=0.05, time_scale=1.0, extra_optimizer_bytes=extra)
    step = plain.memory_model().optimizer_line
    assert more.memory_model().optimizer_line.fixed_bytes == step.fixed_bytes + extra
    assert more.peak_bytes(1) >= step.at(1) + extra  # the replica's peak(b) too
    assert more.max_micro_batch <= plain.max_micro_batch
    devices = [proportional_device(x.capacity("r0"), 2) for x in (plain, more)]
    per_element = extra / (p.state.grads_bytes // 4)
    assert devices[1].step_temp_bytes == pytest.approx(devices[0].step_temp_bytes + per_element)


def test_the_host_stands_in_at_the_devices_speed_with_half_its_memory():
    stand_in = host_stand_in(SimulatedDevice("sim-t4", 2 * MiB, 0.25).info())
    assert (stand_in.name, stand_in.speed, stand_in.simulated) == ("host", 0.25, True)
    assert stand_in.total_bytes == cpu_device().total_bytes // 2


def test_a_profile_written_before_sharding_loads_and_says_what_sharding_needs():
    p = profile_model(mlp_task(), SimulatedDevice("sim", 8 * MiB), make_optimizer=adamw)
    data = p.to_dict()
    del data["state"], data["micro_batch_cap"]
    old = ModelProfile.from_dict(data)
    assert old.state is None and old.capacity("r0").memory is None
    assert old.capacity("r0").max_micro_batch == p.max_micro_batch
    with pytest.raises(ProbeError, match="no model state .* sharding='full'"):
        old.capacity("r0", sharding="full", world_size=2)


# ---------------------------------------------------------------------------
# time per micro-step: warm shapes, medians, a robust line that says when it is not trusted


class CostModel:
    """A deterministic clock (planted as the probe's `measure.now`): each forward of b samples
    costs `fixed + per_sample * b` seconds, plus `cold` on the first `cold_runs` forwards at
    each size (kernel selection, allocator growth) and `hiccups[(b, n)]` on the n-th
    forward at b (a disturbance on a busy machine)."""

    def __init__(self, fixed, per_sample, *, cold=0.0, cold_runs=1, hiccups=None):
        self.fixed, self.per_sample, self.cold, self.cold_runs = fixed, per_sample, cold, cold_runs
        self.hiccups = hiccups or {}
        self.t, self.calls = 0.0, {}

    def __call__(self) -> float:
        return self.t

    def warm(self, b: int) -> float:
        return self.fixed + self.per_sample * b

    def forward(self, b: int) -> None:
        n = self.calls[b] = self.calls.get(b, 0) + 1
        self.t += self.warm(b) + (self.cold if n <= self.cold_runs else 0.0)
        self.t += self.hiccups.get((b, n), 0.0)


def costed_task(cost: CostModel) -> Task:
    """Activations grow with b (the search measures several sizes); time is the cost model's."""
    data = [torch.randn(256) for _ in range(8)]

    def loss_fn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        cost.forward(len(x))
        return model(x).square().sum()

    return Task(lambda: nn.Linear(256, 256), data, torch.stack, loss_fn)


def costed_profile(cost: CostModel, monkeypatch, memory_mib: float = 2.5) -> ModelProfile:
    monkeypatch.setattr(measure, "now", cost)
    return profile_model(
        costed_task(cost), SimulatedDevice("sim", int(memory_mib * MiB)), make_optimizer=adamw
    )


def test_a_shapes_slow_first_micro_steps_are_never_timed_and_the_line_is_the_warm_one(
    monkeypatch,
):
    # The H200 run: first micro-steps at each new shape 25x slower than warm ones made the
    # fitted per-sample cost zero. Planted: 50 ms on the first forward at every size.
    cost = CostModel(0.002, 0.0001, cold=0.050)
    p = costed_profile(cost, monkeypatch)
    assert len({m.micro_batch for m in p.measurements}) >= 3
    for m in (m for m in p.measurements if not m.oom):
        assert m.micro_step_runs_s == pytest.approx((cost.warm(m.micro_batch),) * 3)
        if m.low_micro_batch:
            assert m.low_step_runs_s == pytest.approx((cost.warm(m.low_micro_batch),) * 3)
    assert p.time_trusted and p.time_note == ""
    assert (p.fixed_s, p.per_sample_s) == pytest.approx((0.002, 0.0001))
    assert p.measured_steps <= MAX_MEASURED_STEPS  # the warm-ups are micro-steps, not steps


def test_a_shape_that_stays_slow_for_two_runs_is_outvoted_by_the_median(monkeypatch):
    # two cold forwards per size: one is the warm-up, the other one of three timed runs
    cost = CostModel(0.002, 0.0001, cold=0.050, cold_runs=2)
    p = costed_profile(cost, monkeypatch)
    assert (p.fixed_s, p.per_sample_s) == pytest.approx((0.002, 0.0001))
    assert p.time_trusted


def test_one_disturbed_micro_step_moves_neither_the_sizes_time_nor_the_line(monkeypatch):
    probe = CostModel(0.002, 0.0001)
    b = costed_profile(probe, monkeypatch).max_micro_batch
    cost = CostModel(0.002, 0.0001, hiccups={(b, 3): 0.5})  # the 2nd timed run at the largest
    p = costed_profile(cost, monkeypatch)
    m = next(m for m in p.measurements if m.micro_batch == b)
    assert max(m.micro_step_runs_s) > 0.5 and m.micro_step_s == pytest.approx(cost.warm(b))
    assert (p.fixed_s, p.per_sample_s) == pytest.approx((0.002, 0.0001))


def test_a_time_that_falls_with_the_micro_batch_is_flagged_untrusted_in_profile_and_plan(
    monkeypatch,
):
    cost = CostModel(0.030, -0.00005)  # 30 ms less 0.05 ms per sample: not a device's line
    p = costed_profile(cost, monkeypatch)
    assert not p.time_trusted and "negative slope" in p.time_note
    assert p.per_sample_s == 0 and p.fixed_s > 0  # the line the planner gets, flagged
    cap = p.capacity("r0")
    assert "negative slope" in cap.time_note
    again = ModelProfile.from_json(p.to_json())
    assert again == p and not again.time_trusted
    plan = make_plan(4 * p.max_micro_batch, [cap, replace(cap, device_id="r1", time_note="")])
    notes = [n for n in plan.notes if "time model not trusted" in n]
    assert len(notes) == 1 and notes[0].startswith("sim (r0): time model not trusted: negative")
    assert "(r1)" not in " ".join(plan.notes)


@pytest.mark.parametrize(
    ("points", "line", "trusted", "why"),
    [
        # an exact line over three sizes
        ([(1, 0.011), (4, 0.014), (8, 0.018)], (0.010, 0.001), True, ""),
        # one point far off (a cold shape, timed): Theil-Sen keeps the others' line
        ([(1, 0.011), (4, 0.014), (8, 0.018), (12, 0.022), (6, 0.200)], (0.010, 0.001), True, ""),
        # repeats at a size count as their median
        ([(2, 0.012), (2, 0.012), (2, 0.9), (4, 0.014), (8, 0.018)], (0.010, 0.001), True, ""),
        # time falls with the batch: constant, flagged
        ([(1, 0.030), (4, 0.020), (8, 0.010)], (0.020, 0.0), False, "negative slope"),
        # one size: proportional, flagged
        ([(4, 0.008), (4, 0.008)], (0.0, 0.002), False, "one size measured"),
        # two sizes: a line always fits them, nothing checks it
        ([(1, 0.011), (4, 0.014)], (0.010, 0.001), False, "too few sizes"),
        # two sizes of five far off: the robust line goes through the other three
        ([(1, 0.010), (2, 0.030), (3, 0.011), (4, 0.040), (5, 0.012)], (0.0095, 0.0005), True, ""),
        # no line fits: the median size is far from the robust line
        ([(1, 0.01), (2, 0.03), (3, 0.006), (4, 0.04), (5, 0.008), (6, 0.05)], None, False, "poor"),
        # a line through zero below b=0: a ray from the origin (no negative fixed cost)
        ([(4, 0.002), (8, 0.010), (16, 0.026)], (0.0, 0.038 / 28), False, "poor fit"),
        ([(10, 0.0099), (20, 0.0200), (40, 0.0401)], (0.0, 0.07 / 70), True, ""),
    ],
)
def test_the_time_line_fit(points, line, trusted, why):
    fit = fit_time_line(points)
    if line is not None:
        assert (fit.fixed_s, fit.per_sample_s) == pytest.approx(line, abs=1e-9)
    assert fit.per_sample_s >= 0 and fit.fixed_s >= 0
    assert fit.trusted is trusted and (why in fit.note if why else fit.note == "")
