"""The launcher end to end on a real local Ray: probe, plan, gloo DDP, faults, resume.

One Ray instance serves the module. Jobs are tiny (a 1-layer GPT, a global
batch of 12, a few steps) so that three ranks fit two cores.
"""

from __future__ import annotations

import collections
import json
import pathlib
import sys

import pytest
import ray
import torch
from daemon_util import TINY

from autobatch.errors import LaunchError
from autobatch.planning.sampler import GlobalBatchSampler
from launcher.job.checkpoint import list_checkpoints
from launcher.job.controller import JobController
from launcher.job.events import MetricsAt, Progress, Restarting, Resuming, StateChanged
from launcher.job.spec import parse_spec

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from ledger import last_tries  # noqa: E402 (benchmarks/ledger.py)

# Memory sizes give micro-batch limits of about 12, 6 and 3: a global batch of 24
# needs accumulation somewhere. keep_all: the tiny model's fixed costs would
# otherwise make the planner leave devices out, depending on noisy timings.
SIMS_3 = [
    {"name": "sim-big", "memory": "300KiB", "speed": 1.0},
    {"name": "sim-mid", "memory": "200KiB", "speed": 1.0},
    {"name": "sim-small", "memory": "150KiB", "speed": 1.0},
]


def job(tmp_path: pathlib.Path, **overrides) -> dict:
    spec = {
        "name": "t",
        "task_args": TINY,
        "global_batch_size": 24,
        "max_steps": 6,
        "optimizer": {"name": "adamw", "lr": 0.01},
        "devices": {"select": "simulated", "simulated": SIMS_3, "keep_all": True},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 2},
        "audit_samples": True,
        "seed": 1,
    }
    spec.update(overrides)
    return spec


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    import os

    os.environ["AUTOBATCH_PROFILE_CACHE"] = str(tmp_path_factory.mktemp("profiles"))
    ray.init(
        address="local",  # a fresh Ray, never one that `ray start` recorded here
        num_cpus=6,
        include_dashboard=False,
        object_store_memory=150 * 2**20,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def run(spec: dict) -> tuple:
    events = []
    summary = JobController(parse_spec(spec), listener=events.append).run()
    return summary, events


def audited_steps(ckpt_dir: pathlib.Path) -> dict[int, list[int]]:
    """Per step, the indices every rank processed in its last try: the newest run's (runs on
    one checkpoint directory share its ledger) highest attempt (benchmarks/ledger.py)."""
    return last_tries(ckpt_dir)


def assert_every_global_batch_exact(
    spec: dict, ckpt_dir: pathlib.Path, *, through: int | None = None
) -> None:
    """Every step of the job held exactly its global batch (the ledger); `through`: only
    the steps before it (a cancelled job's, whose last step may have been cut short)."""
    sampler = GlobalBatchSampler(TINY["dataset_size"], spec["global_batch_size"], seed=spec["seed"])
    steps = audited_steps(ckpt_dir)
    if through is not None:
        steps = {step: indices for step, indices in steps.items() if step < through}
    assert sorted(steps) == list(range(spec["max_steps"] if through is None else through))
    for step, indices in steps.items():
        assert sorted(indices) == sorted(sampler.global_batch(step).tolist()), f"step {step}"


def assert_same_parameters(got: dict, want: dict) -> None:
    """float32 parameters of two runs of the same job, relative 1e-5."""
    assert got.keys() == want.keys()
    for name, p in got.items():
        assert (p - want[name]).abs().max() / want[name].abs().max() <= 1e-5, name


def assert_restart_resumed_at(ckpt_dir: pathlib.Path, step: int) -> None:
    """The attempt after the restart began exactly at the checkpoint's step, on every rank."""
    for path in ckpt_dir.glob("samples-rank*.jsonl"):
        retried = [json.loads(line) for line in path.read_text().splitlines()]
        first = min(e["step"] for e in retried if e["attempt"] == 1)
        assert first == step, f"{path.name}: the restart began at step {first}, not {step}"


@pytest.fixture(scope="module")
def baseline(local_ray, tmp_path_factory):
    """The reference job on three mixed devices; its /metrics scraped once mid-run."""
    import urllib.request

    tmp = tmp_path_factory.mktemp("baseline")
    spec = job(tmp)
    seen = {}

    def listener(event):
        seen.setdefault("events", []).append(type(event).__name__)
        if isinstance(event, StateChanged):
            seen.setdefault("states", []).append(event.state)
        if isinstance(event, MetricsAt):
            seen["url"] = event.url
        if isinstance(event, Progress) and "text" not in seen:
            seen["text"] = urllib.request.urlopen(seen["url"], timeout=30).read().decode()

    summary = JobController(parse_spec(spec), listener=listener).run()
    return spec, tmp / "ckpt", summary, seen


def test_three_heterogeneous_simulated_devices_train_with_an_exact_global_batch(baseline):
    spec, ckpt, summary, seen = baseline
    plan = summary.plan
    assert summary.steps == 6 and summary.restarts == 0
    assert plan.world_size == 3
    assert len({r.micro_batch_size for r in plan.ranks}) > 1  # heterogeneous
    assert_every_global_batch_exact(spec, ckpt)
    runner_events = [e for e in seen["events"] if e != "StateChanged"]
    assert runner_events[:2] == ["Planned", "MetricsAt"] and runner_events[-1] == "Finished"
    assert seen["states"] == [
        "reserving", "probing", "planning", "starting", "training", "succeeded"
    ]  # fmt: skip
    assert list_checkpoints(ckpt)[-1].name == "step_00000006.pt"


def test_metrics_are_served_while_the_job_runs(baseline):
    _, _, _, seen = baseline
    assert seen["url"].startswith("http://127.0.0.1:")
    for name in (
        "autobatch_micro_batch_size",
        "autobatch_torch_memory_peak_bytes",
        "autobatch_plan_predicted_peak_bytes",
        "autobatch_effective_global_batch_size",
    ):
        assert name in seen["text"]
    assert 'rank="2"' in seen["text"]


def test_effective_global_batch_is_measured_and_a_short_step_is_refused(local_ray, tmp_path):
    # A planted bug: rank 0 drops one sample of step 3. Every rank counts the samples it
    # processed; their sum rides the step's small all-reduce. The short step is refused
    # on every rank (no optimizer update) and the job fails saying so.
    spec = job(tmp_path, faults=[{"kind": "short_batch", "rank": 0, "step": 3}])
    seen: list = []
    runner = JobController(parse_spec(spec), listener=seen.append)
    with pytest.raises(LaunchError, match=r"step 3: the ranks processed 23 samples, not the "):
        runner.run()
    snaps = [s for e in seen if isinstance(e, Progress) for s in e.snapshots]
    by_step = {(s.rank, s.optimizer_steps_total): s.effective_global_batch_size for s in snaps}
    assert all(v == 24 for (_, step), v in by_step.items() if step < 3)
    assert 23 in by_step.values()  # the refused step is reported as measured, not as planned
    assert max(step for _, step in by_step) == 3  # no rank counted a 4th step
    assert list_checkpoints(tmp_path / "ckpt")[-1].name == "step_00000002.pt"


def test_a_device_too_small_for_one_sample_is_left_out_and_the_job_trains(local_ray, tmp_path):
    sims = [*SIMS_3[:2], {"name": "sim-tiny", "memory": "40KiB", "speed": 1.0}]
    spec = job(tmp_path, devices={"select": "simulated", "simulated": sims})
    summary, _ = run(spec)
    assert summary.steps == 6
    assert "sim-tiny" not in {r.device_name for r in summary.plan.ranks}
    (tiny,) = [e for e in summary.plan.excluded if e.device_name == "sim-tiny"]
    assert "one sample does not fit" in tiny.reason
    assert_every_global_batch_exact(spec, tmp_path / "ckpt")


def test_killed_worker_restarts_from_the_checkpoint_and_finishes(baseline, tmp_path):
    spec = job(tmp_path, faults=[{"kind": "crash", "rank": 1, "step": 3}])
    summary, events = run(spec)
    assert summary.restarts == 1
    assert summary.steps == 6
    restart = next(e for e in events if isinstance(e, Restarting))
    assert restart.decision.cause == "lost" and restart.resume.endswith("step_00000002.pt")
    assert_every_global_batch_exact(spec, tmp_path / "ckpt")
    assert_restart_resumed_at(tmp_path / "ckpt", 2)
    # The same run as one that was never interrupted: model, optimizer state, schedule.
    assert_same_parameters(summary.parameters, baseline[2].parameters)


@pytest.mark.parametrize("where", ["first", "last"], ids=["no_sync", "synced"])
def test_out_of_memory_lowers_that_device_and_keeps_the_global_batch(baseline, tmp_path, where):
    first = baseline[2].plan
    oom_rank = next(r.rank for r in first.ranks if r.accumulation_steps >= 2 or where == "last")
    spec = job(tmp_path, faults=[{"kind": "oom", "rank": oom_rank, "step": 2, "micro_step": where}])
    summary, events = run(spec)
    before, after = first.ranks[oom_rank], summary.plan.ranks[oom_rank]
    assert after.max_micro_batch < before.max_micro_batch  # the plan changed for that device
    assert summary.plan.global_batch_size == 24
    assert summary.steps == 6
    assert summary.oom_events >= 1
    if where == "last":  # the synced backward: torn down and restarted from the checkpoint
        assert summary.restarts == 1
        assert_restart_resumed_at(tmp_path / "ckpt", 2)
    else:  # agreed by all ranks, retried in place
        assert summary.restarts == 0
    assert_every_global_batch_exact(spec, tmp_path / "ckpt")
    # Other micro-batches, the same full-batch gradients: the same parameters.
    assert_same_parameters(summary.parameters, baseline[2].parameters)


def test_one_device_and_three_mixed_devices_give_the_same_parameters(baseline, tmp_path):
    three = baseline[2]
    one_sim = [{"name": "sim-one", "memory": "2MiB", "speed": 1.0}]
    one, _ = run(job(tmp_path, devices={"select": "simulated", "simulated": one_sim}))
    assert one.plan.world_size == 1 and three.plan.world_size == 3
    for name, p in one.parameters.items():
        q = three.parameters[name]
        assert (p - q).abs().max() / p.abs().max() <= 1e-5, name


def test_resume_continues_at_the_next_global_batch(baseline, tmp_path):
    whole = baseline[2]
    first, _ = run(job(tmp_path, max_steps=3))
    assert first.steps == 3
    second, events = run(job(tmp_path))
    assert any(isinstance(e, Resuming) for e in events)
    assert second.steps == 6
    for name, p in whole.parameters.items():
        assert torch.allclose(p, second.parameters[name], rtol=1e-6, atol=1e-7), name


def test_indices_audit_catches_a_wrong_batch(tmp_path):
    """The audit helper itself can fail: a ledger missing a sample is rejected."""
    d = tmp_path / "ckpt"
    d.mkdir()
    sampler = GlobalBatchSampler(96, 24, seed=1)
    rows = [
        {"attempt": 0, "step": s, "micro_batches": [sampler.global_batch(s).tolist()[:-1]]}
        for s in range(4)
    ]
    (d / "samples-rank0.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(AssertionError):
        assert_every_global_batch_exact({"global_batch_size": 24, "seed": 1, "max_steps": 4}, d)


def test_causal_lm_lora_job_packs_by_length_keeps_every_batch_and_saves_the_adapter(
    local_ray, tmp_path
):
    from autobatch.tasks.causal_lm import causal_lm_task
    from autobatch.tasks.lm_example import make_example_jsonl, make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "model")
    data = make_example_jsonl(tmp_path / "data.jsonl", 200, kind="prompt_completion")
    spec = job(
        tmp_path,
        name="lm",
        task="causal_lm",
        task_args={"model_dir": str(model_dir), "data": str(data), "lora": {"r": 4}},
        max_seq_len=64,
        global_batch_size=16,
        max_steps=4,
        precision="auto",
        devices={
            "select": "simulated",
            "simulated": [
                {"name": "sim-big", "memory": "24MiB"},
                {"name": "sim-small", "memory": "16MiB", "speed": 0.5},
            ],
            "keep_all": True,
        },
        output_dir=str(tmp_path / "adapter"),
    )
    snapshots = []

    def listener(event):
        if isinstance(event, Progress):
            snapshots.extend(event.snapshots)

    summary = JobController(parse_spec(spec), listener=listener).run()
    assert summary.steps == 4 and summary.restarts == 0
    assert "precision fp32 (auto): sim-big is not a GPU: fp32" in summary.plan.notes
    # Every step's global batch is exactly the sampler's 16 sequences, split by length.
    task = causal_lm_task(model_dir=str(model_dir), data=str(data), max_seq_len=64)
    sampler = GlobalBatchSampler(len(task.dataset), 16, seed=1)
    steps = audited_steps(tmp_path / "ckpt")
    assert sorted(steps) == [0, 1, 2, 3]
    for step, indices in steps.items():
        assert sorted(indices) == sorted(sampler.global_batch(step).tolist()), f"step {step}"
    wastes = [s.padding_waste_ratio for s in snapshots]
    assert wastes and all(w is not None and 0 <= w < 1 for w in wastes)
    assert summary.output == str(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "tokenizer.json").exists()


def test_fp16_resume_keeps_the_loss_scale(local_ray, tmp_path):
    # A resumed fp16 job must go on with the loss scale it had, not the initial 65536
    # (which would skip steps to find the scale again). The tiny model never overflows, so
    # the checkpoint's scale is set by hand, as if earlier overflows had lowered it.
    one = {"select": "simulated", "simulated": [{"name": "sim-big", "memory": "300KiB"}]}
    first, _ = run(job(tmp_path, precision="fp16", devices=one, max_steps=3))
    state = torch.load(first.checkpoint, weights_only=False)
    assert state["scaler"]["scale"] == 65536.0
    state["scaler"]["scale"] = 1024.0
    torch.save(state, first.checkpoint)
    second, _ = run(job(tmp_path, precision="fp16", devices=one))
    assert second.steps == 6
    assert torch.load(second.checkpoint, weights_only=False)["scaler"]["scale"] == 1024.0


def test_elastic_job_resized_1_3_2_trains_as_on_one_device(local_ray, tmp_path):
    STEPS = 60  # noqa: N806
    """Grown from 1 device to 3, shrunk to 2 at step boundaries: every global batch exact,
    the step counter never goes back, the same parameters as the job on 1 device throughout."""
    from launcher.job.events import Resized

    devices = {"select": "simulated", "simulated": SIMS_3, "keep_all": True, "min_count": 1}
    ref = job(tmp_path / "ref", devices=devices, max_steps=STEPS)
    alone = JobController(parse_spec(ref), devices=[0]).run()
    assert alone.plan.world_size == 1 and alone.resizes == {}

    spec = job(tmp_path, devices=devices, max_steps=STEPS, checkpoint={"interval": 7,
               "dir": str(tmp_path / "ckpt")})  # fmt: skip
    events, steps = [], []
    runner: JobController

    def listener(event):  # grow at the first progress report, shrink once grown
        events.append(event)
        if isinstance(event, Progress):
            steps.append(max(s.step for s in event.snapshots))
            if "asked" not in events:
                events.append("asked")
                runner.request_resize([0, 1, 2], "grew", "grew into freed devices")
        if isinstance(event, Resized) and event.reason == "grew":
            runner.request_resize([0, 2], "shrank", "shrank for job x")

    runner = JobController(parse_spec(spec), devices=[0], listener=listener)
    summary = runner.run()
    restarts = [e.decision.reason for e in events if isinstance(e, Restarting)]
    assert not restarts, restarts
    resizes = [e for e in events if isinstance(e, Resized)]
    assert [(e.reason, e.before, e.devices) for e in resizes] == [
        ("grew", (0,), (0, 1, 2)),
        ("shrank", (0, 1, 2), (0, 2)),
    ]
    assert summary.resizes == {"grew": 1, "shrank": 1} and summary.restarts == 0
    assert summary.plan.world_size == 2 and summary.steps == STEPS
    assert steps == sorted(steps)  # never back
    # No step done twice: each attempt began at the resize's step, right after the last
    # step of the attempt before it (checkpoints every 7 steps would not give that).
    spans = attempt_spans(tmp_path / "ckpt")
    assert [spans[a][0] for a in (1, 2)] == [e.step for e in resizes]
    assert [spans[a][0] for a in (1, 2)] == [spans[a][1] + 1 for a in (0, 1)], spans
    assert_every_global_batch_exact(spec, tmp_path / "ckpt")
    assert_same_parameters(summary.parameters, alone.parameters)


def attempt_spans(ckpt_dir: pathlib.Path) -> dict[int, tuple[int, int]]:
    """Per attempt, the first and last step any rank's ledger shows."""
    steps = collections.defaultdict(list)
    for path in ckpt_dir.glob("samples-rank*.jsonl"):
        for e in map(json.loads, path.read_text().splitlines()):
            steps[e["attempt"]].append(e["step"])
    return {a: (min(s), max(s)) for a, s in steps.items()}


def test_a_cancel_while_probing_abandons_the_probe(local_ray, tmp_path):
    # At speed 0.0001 the probe's paced steps would take many minutes: the run ends (within
    # the join's bound) only if the controller hears the cancel while the profile runs.
    import threading

    from launcher.errors import JobCancelled

    crawl = [{"name": "sim-crawl", "memory": "300KiB", "speed": 0.0001}]
    spec = job(tmp_path, devices={"select": "simulated", "simulated": crawl})
    stop, probing, states, ended = threading.Event(), threading.Event(), [], []

    def listener(event):
        if isinstance(event, StateChanged):
            states.append(event.state)
            if event.state == "probing":
                probing.set()

    def run():
        try:
            JobController(parse_spec(spec), listener=listener, stop=stop).run()
        except JobCancelled as exc:
            ended.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert probing.wait(120)
    stop.set()
    thread.join(120)
    assert not thread.is_alive() and ended, "the probe did not hear the cancel"
    assert states[-2:] == ["probing", "cancelled"]
