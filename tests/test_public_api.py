"""The public surface of the library, and its independence from Ray and the launcher."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

import autobatch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_public_names_are_pinned():
    assert sorted(autobatch.__all__) == [
        "Accumulator",
        "AutobatchError",
        "DeviceCapacity",
        "GlobalBatchSampler",
        "LaunchError",
        "MemoryModel",
        "MicroBatchSampler",
        "ModelState",
        "PeakLine",
        "Plan",
        "PlanError",
        "ProbeError",
        "RankPlan",
        "Replicated",
        "SHARDINGS",
        "SamplerError",
        "SamplerState",
        "Sharded",
        "Sharding",
        "SimulatedDevice",
        "StepBatches",
        "StepLoader",
        "StepResult",
        "Task",
        "TokenBudget",
        "default_num_workers",
        "equal_split_plan",
        "load_sharded",
        "make_plan",
        "micro_batch_loader",
        "pack_global_batch",
        "plan_for_group",
        "save_sharded",
        "token_budgets",
        "wrapping_for",
    ]
    for name in autobatch.__all__:
        assert hasattr(autobatch, name)


def test_library_never_imports_ray_or_the_launcher():
    offenders = []
    for path in (ROOT / "autobatch").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            banned = [n for n in names if n.split(".")[0] in ("ray", "launcher")]
            offenders += [f"{path.name}: {n}" for n in banned]
    assert offenders == []


def test_importing_the_library_loads_no_ray():
    code = "import sys, autobatch; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_public_name_resolves_lazily_to_its_module():
    from autobatch import _EXPORTS

    assert sorted(_EXPORTS) == sorted(autobatch.__all__)
    code = "import sys, autobatch.planning.plan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # the planner is pure: no torch


def _device(device_id: str, budget_mib: int) -> autobatch.DeviceCapacity:
    """A device written by hand from public names: a replica holds 32 MiB of state (P 8,
    G 8, O 16 MiB; blocks of 1 MiB), 2 MiB a sample of activations, and its optimizer step
    8 MiB more (40 MiB)."""
    mib = 2**20
    state = autobatch.ModelState(
        params_bytes=8 * mib,
        grads_bytes=8 * mib,
        optimizer_bytes=16 * mib,
        largest_unit_bytes=1 * mib,
        root_unit_bytes=0,
    )
    memory = autobatch.MemoryModel(
        budget_bytes=budget_mib * mib,
        micro_lines=(autobatch.PeakLine(state.total_bytes, 2 * mib),),
        optimizer_line=autobatch.PeakLine(state.total_bytes + 8 * mib, 0),
        state=state,
        max_micro_batch=max(0, (budget_mib - 32) // 2),
        cap=64,
    )
    fit = memory.fit()
    return autobatch.DeviceCapacity(
        device_id,
        "sim",
        fit.max_micro_batch,
        fixed_s=0.01,
        per_sample_s=0.001,
        memory_bytes=budget_mib * mib,
        memory=memory,
    )


def test_a_sharded_job_is_planned_from_public_names_alone():
    # A 30 MiB device cannot hold a replica (40 MiB); over 3 ranks, sharded, it can.
    devices = [_device("a", 30), _device("b", 30), _device("c", 60)]
    for sharding in autobatch.SHARDINGS[1:]:  # every mode that shards
        plan = autobatch.make_plan(24, devices, sharding=sharding, keep_all=True)
        assert (plan.sharding, plan.world_size) == (sharding, 3)
        assert sum(r.samples for r in plan.ranks) == 24
    auto = autobatch.make_plan(24, devices, sharding="auto")
    assert auto.sharding == "optimizer"  # the lightest mode in which every device fits
    with pytest.raises(autobatch.PlanError, match="cannot fit even one sample"):
        autobatch.make_plan(24, devices, sharding="none", keep_all=True)


def test_planning_sharding_without_a_memory_model_names_only_public_things():
    bare = autobatch.DeviceCapacity("x", "T4", 4, fixed_s=0.01, per_sample_s=0.001)
    with pytest.raises(autobatch.PlanError, match="no memory model") as info:
        autobatch.make_plan(8, [bare, bare.__class__("y", "T4", 4, 0.01, 0.001)], sharding="full")
    named = set(re.findall(r"\b[A-Za-z]+(?:_[a-z]+)+\b|\b[A-Z][a-z]+[A-Z]\w+\b", str(info.value)))
    assert named and named <= set(autobatch.__all__), named
