"""The public surface of the library, and its independence from Ray and the launcher."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import autobatch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_public_names_are_pinned():
    assert sorted(autobatch.__all__) == [
        "Accumulator",
        "AutobatchError",
        "DeviceCapacity",
        "GlobalBatchSampler",
        "LaunchError",
        "MicroBatchSampler",
        "Plan",
        "PlanError",
        "ProbeError",
        "RankPlan",
        "Replicated",
        "SamplerError",
        "SamplerState",
        "Sharded",
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
