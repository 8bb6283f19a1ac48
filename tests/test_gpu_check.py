"""The GPU checks' machinery, on the CPU: reports that survive a failure, the gradient
all-reduce staged through host memory, the parts of RESULTS.md's GPU section."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
_environ = dict(os.environ)
import gpu_check  # noqa: E402
import gpu_common  # noqa: E402
import gpu_probe_check  # noqa: E402
import make_results  # noqa: E402

os.environ.clear()  # gpu_common guards the environment of the checks, not of this session
os.environ.update(_environ)


@pytest.mark.parametrize(
    ("rounds", "order"),
    [
        (1, ["plan", "equal split"]),
        (2, ["plan", "equal split", "equal split", "plan"]),  # each goes first once
        (3, ["plan", "equal split", "equal split", "plan", "plan", "equal split"]),
    ],
)
def test_the_runs_alternate_which_goes_first(rounds, order):
    settings = gpu_check.Settings((1,), 10, rounds, True, "bf16", 0, "/tmp", 0.0)
    assert settings.run_order() == order


def test_each_check_replaces_only_its_own_part_and_make_results_keeps_them(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Summary\n\nkept\n")
    gpu_common.write_part("gpu_check", ["first run"], results)  # creates the GPU section
    gpu_common.write_part("gpu_probe_check", ["probe run"], results)
    gpu_common.write_part("gpu_check", ["second run"], results)
    text = results.read_text()
    assert "kept" in text and "first run" not in text
    section = make_results.gpu_section(text)  # what `make bench` keeps
    assert section.startswith(gpu_common.BEGIN) and section.endswith(gpu_common.END)
    assert "second run" in section and "probe run" in section
    assert section.count("<!-- gpu-check:gpu_check:begin -->") == 1


def test_a_record_saves_what_was_measured_and_a_failed_section_to_out(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    record = gpu_common.Record("some_check", "some check")
    record.note("- run 1 (plan): 100.0 samples/s")
    record.fail("rank 1 in run 2/4 (equal split): CheckFailure: `OUT OF MEMORY`")
    written = record.save(results=False)
    md, js = (tmp_path / "out" / f"some_check.{ext}" for ext in ("md", "json"))
    assert written == [md, js]
    text = md.read_text()
    assert text.index("100.0 samples/s") < text.index("**FAILED.**") < text.index("rank 1 in")
    data = json.loads(js.read_text())
    assert data["failures"] == record.failures and data["lines"] == record.lines


def test_rank_failures_name_the_first_error_first():
    settings = gpu_check.Settings((1, 1, 1, 1), 10, 2, True, "bf16", 0, "/tmp", 0.0)
    gloo = {"phase": "run 2/4", "at_s": 30.5, "error": "RuntimeError: `Connection closed`"}
    planted = {"phase": "run 2/4", "at_s": 30.1, "error": "CheckFailure: `OUT OF MEMORY`"}
    reports = [
        {"rank": 0, "done": False, "current": "run 2/4", "error": gloo},
        {"rank": 1, "done": False, "current": "run 2/4", "error": planted},
        {"rank": 2, "done": True, "current": "run 4/4", "error": None},
        # rank 3 recorded nothing: it died while starting
    ]
    lines = gpu_check.rank_failures(settings, reports, [1, 1, 0, -9])
    assert lines == [
        "rank 1 in run 2/4 at +30.1 s: CheckFailure: `OUT OF MEMORY`",
        "rank 0 in run 2/4 at +30.5 s: RuntimeError: `Connection closed`",
        "rank 3: exit code -9, nothing recorded (it died while starting)",
    ]


def test_rank_failures_order_by_cause_not_by_clock():
    # The planted cause and its peers' broken collectives, recorded in the same tenth of a
    # second (as on a busy machine): the cause is named first, as the failure policy does.
    settings = gpu_check.Settings((1, 1, 1), 10, 2, True, "bf16", 0, "/tmp", 0.0)
    gloo = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:11445")
    planted = gpu_check.CheckFailure("OUT OF MEMORY (rank 1, step 2): planted failure")
    reports = [
        {"rank": r, "done": False, "current": "run 2/2", "error": {
            "phase": "run 2/2", "at_s": 42.1, "error": gpu_common.error_line(exc),
            "cause": gpu_check.cause_order(exc)}}
        for r, exc in enumerate([gloo, planted, gloo])
    ]  # fmt: skip
    lines = gpu_check.rank_failures(settings, reports, [1, 1, 1])
    assert [line.split(" in ")[0] for line in lines] == ["rank 1", "rank 0", "rank 2"]
    # a bug or bad input, then an out-of-memory, then what a peer's failure causes
    order = [ValueError("bad"), planted, torch.OutOfMemoryError("oom"), gloo, KeyboardInterrupt()]
    assert [gpu_check.cause_order(e) for e in order] == [0, 2, 2, 3, 3]


def _synced_grads(rank: int, world_size: int, staged: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 512), nn.GELU(), nn.Linear(512, 1024), nn.Linear(1024, 2))
    ddp = DDP(model, bucket_cap_mb=0.5)  # several buckets (the first holds 1 MiB)
    counter = None
    if staged:
        counter = gpu_check.Collectives()
        ddp.register_comm_hook(None, counter.hook)
    x = torch.randn(4 + rank, 8, generator=torch.Generator().manual_seed(rank))
    for _ in range(2):  # DDP rebuilds its buckets after the first backward: 1, then 2
        ddp(x).pow(2).sum().backward()
    if counter is not None:
        counter.close()
        synced, buckets, others = counter.counts()
        assert (synced, buckets, others) == (2, 3, 0)  # one all-reduce per bucket, no other
    dist.barrier()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.slow
def test_the_host_staged_all_reduce_averages_as_ddp_does():
    default = run_ranks(_synced_grads, 2, False)
    staged = run_ranks(_synced_grads, 2, True)
    for by_rank in (default, staged):
        for a, b in zip(*by_rank):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # the ranks agree
    for a, b in zip(default[0], staged[0]):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_a_planted_failure_leaves_a_failed_section_with_what_was_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    args = ["--cpu", "--steps", "7", "--rounds", "1", "--plant-failure", "1"]
    assert gpu_check.main(args) == 1
    text = (tmp_path / "gpu_check.md").read_text()
    measured, failed = text.split("**FAILED.**")
    assert "| 2 | 8.0 MiB |" in measured  # every rank's probe and plan
    assert "- run 1 (plan):" in measured and "- run 2 (" not in measured
    errors = [line for line in failed.splitlines() if line.startswith("- ")]
    assert "rank 1 in run 2/2 (equal split)" in errors[0] and "planted failure" in errors[0]
    assert len(errors) == 3  # the others failed in their next collective, and said so
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [len(r["runs"]) for r in data["ranks"]] == [1, 1, 1]


@pytest.mark.slow
def test_the_probe_check_runs_on_a_simulated_device(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_probe_check.main(["--cpu", "--caps-mib", "8", "--steps", "2"]) == 0
    text = (tmp_path / "gpu_probe_check.md").read_text()
    assert "2 steps x 2 micro-batches of" in text and "0 OOM" in text
    assert "FAILED" not in text
    # the time model: trusted or not, per size predicted vs measured, at b against the goal
    assert "ms/sample (trusted)" in text or "ms/sample (NOT trusted: " in text
    assert "micro-step time, predicted / measured (median, warm): b=1: " in text
    assert "at the chosen b=" in text and "(goal)" in text
    data = json.loads((tmp_path / "gpu_probe_check.json").read_text())
    rows = data["caps"][0]["timing"]
    assert rows[0]["b"] == 1 and all(r["measured_s"] > 0 and r["predicted_s"] > 0 for r in rows)


def test_each_rank_reports_the_plans_predicted_compute_against_the_measured():
    from autobatch.planning.plan import DeviceCapacity
    from autobatch.planning.planner import make_plan

    caps = [DeviceCapacity("r0", "a", 8, 0.001, 0.001), DeviceCapacity("r1", "b", 4, 0.002, 0.002)]
    plan = make_plan(12, caps, keep_all=True)
    reports = []
    for r in plan.ranks:
        line = plan.capacity(r.rank).micro_step_time
        predicted = sum(line(b) for b in r.micro_batches)
        by_size = {
            str(b): {"predicted_s": line(b), "measured_s": 2 * line(b)} for b in r.micro_batches
        }
        run = {"label": "plan", "compute_s": [2 * predicted, 2.2 * predicted, 1.8 * predicted],
               "predicted_compute_s": predicted, "micro_step_by_size": by_size}  # fmt: skip
        reports.append({"rank": r.rank, "runs": [run, {"label": "equal split"}]})
    lines = gpu_check.compute_lines(plan, reports)
    rows = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == plan.world_size
    for row, r in zip(rows, plan.ranks):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == str(r.rank) and cells[4] == "2.00"  # measured / predicted
        assert cells[5].startswith(f"b={r.micro_batches[0]}: ")
    assert gpu_check.compute_lines(plan, [{"rank": 0, "runs": []}]) == []  # nothing measured


# ---------------------------------------------------------------------------
# the sharded case (FSDP2)


@pytest.mark.parametrize(
    ("mode", "blocks", "micro_steps", "want"),
    [
        ("optimizer", 2, 1, (3, 3)),  # one all-gather, one reduce-scatter per unit and step
        ("optimizer", 2, 4, (3, 3)),  # ... however many micro-steps
        ("full", 2, 1, (5, 3)),  # forward: 3 units; backward: 2 blocks (the root stays)
        ("full", 2, 4, (20, 12)),  # ... in every micro-step
        ("full", 0, 2, (2, 2)),  # no blocks: the root is the only unit
    ],
)
def test_fsdp_collectives_per_step_by_mode(mode, blocks, micro_steps, want):
    assert gpu_check.expected_collectives(mode, blocks, micro_steps) == want


@pytest.mark.parametrize(
    ("owners", "micro_steps", "want"),
    [
        ((1, 1, 1), 1, (5, 3)),  # one owner per unit: as "full"
        ((1, 2, 1), 2, (2 * 7, 2 * 4)),  # a block split over two ranks: two of each for it
        ((3,), 1, (3, 3)),  # the root alone, owned by three: gathered once
    ],
)
def test_proportional_collectives_per_step_count_owners(owners, micro_steps, want):
    blocks = len(owners) - 1
    assert gpu_check.expected_collectives("proportional", blocks, micro_steps, owners) == want


def _sharded_params(rank: int, world_size: int, staged: bool) -> tuple[dict, tuple[int, int]]:
    from autobatch.step.shard import Sharded

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 33), nn.GELU(), nn.Linear(33, 7), nn.Linear(7, 2))
    wrapping = Sharded("full", blocks=lambda m: [m[0], m[2]])
    model = wrapping.wrap(model, torch.device("cpu"))
    counter = gpu_check.ShardedCollectives()
    if staged:
        gpu_check.stage_fsdp(model, counter)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # the update scales with the gradient
    for step in range(2):
        x = torch.randn(3 + rank, 8, generator=torch.Generator().manual_seed(10 * step + rank))
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    counter.close()
    whole = {n: gpu_check._whole(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():  # gathered by hand as full_tensor() gathers
        torch.testing.assert_close(whole[n], p.full_tensor(), rtol=0, atol=0)
    return whole, counter.counts()


@pytest.mark.slow
def test_fsdp2s_collectives_staged_through_host_memory_train_as_its_own():
    own = run_ranks(_sharded_params, 3, False)
    staged = run_ranks(_sharded_params, 3, True)
    assert own[0][1] == staged[0][1] == (2 * 5, 2 * 3)  # 3 units; 2 blocks regathered
    for name, want in own[0][0].items():
        torch.testing.assert_close(staged[0][0][name], want)
        torch.testing.assert_close(staged[2][0][name], want, rtol=0, atol=0)


def _sharded_reports(**override) -> tuple[gpu_check.Settings, list[dict], dict]:
    """Two ranks' sharded 'optimizer' results as the check records them: all within bounds,
    except what `override` changes (rank 1's run fields, or the parameter errors)."""
    from autobatch.planning.plan import DeviceCapacity
    from autobatch.planning.planner import make_plan

    peaks = {"peak_fixed_bytes": 2**20, "peak_per_sample_bytes": 2**18}
    caps = [DeviceCapacity(f"rank{r}", "dev", 8, 0.01, 0.001, **peaks) for r in range(2)]
    plan = make_plan(16, caps, keep_all=True)
    reports = []
    for r in range(2):
        run = {
            "gathers_per_step": (3, 3),  # 2 blocks and the root, 2 steps
            "scatters_per_step": (3, 3),
            "peak_bytes": plan.ranks[r].predicted_peak_bytes,
        }
        if r == 1:
            run.update(override.get("run", {}))
        entry = {"plan_json": plan.to_json(), "blocks": 2, "run": run}
        reports.append({"rank": r, "sharded": {"optimizer": entry}})
    settings = gpu_check.Settings(
        (1, 1), 10, 1, True, "bf16", 0, "/tmp", 0.0, sharding=("optimizer",)
    )
    errors = {"optimizer": {"params": 1e-9, "update": 1e-6, **override.get("errors", {})}}
    return settings, reports, errors


@pytest.mark.parametrize(
    ("override", "failure"),
    [
        ({}, None),  # every figure within bounds: no failure
        ({"run": {"peak_bytes": 2**30}}, "rank 1 optimizer: measured peak"),  # above prediction
        ({"run": {"gathers_per_step": (3, 6)}}, "rank 1 optimizer: (all-gathers"),  # extra gathers
        ({"errors": {"update": 1e-3}}, "optimizer: fp32 parameters' change"),  # not exact
    ],
)
def test_a_sharded_run_fails_the_check_on_collectives_peak_or_parameters(override, failure):
    settings, reports, errors = _sharded_reports(**override)
    bad = gpu_check.sharded_verdict(settings, reports, errors)
    if failure is None:
        assert bad == []
    else:
        assert len(bad) == 1 and bad[0].startswith(failure), bad


@pytest.mark.slow
def test_the_sharded_case_runs_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    args = ["--cpu", "--steps", "7", "--rounds", "1", "--sharded-steps", "2"]
    assert gpu_check.main(args) == 0
    text = (tmp_path / "gpu_check.md").read_text()
    assert "FAILED" not in text and "checks: all passed" in text
    for mode in ("optimizer", "full"):
        assert f"Sharded('{mode}'), FSDP2 on the same gloo group" in text
    assert "Proportional (state shares " in text and "| broadcasts / step |" in text
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    for rank in data["ranks"]:  # every rank ran every mode, the collectives as expected
        assert set(rank["sharded"]) == {"optimizer", "full", "proportional"}
        assert len(rank["sharded"]["full"]["run"]["gathers_per_step"]) == 2
        assert len(rank["sharded"]["proportional"]["run"]["unit_owners"]) >= 2
