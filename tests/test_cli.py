"""The `autobatch` command as a user runs it: one-line errors, exit codes, plan output."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def autobatch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "no/such/job.yaml"], "error: cannot read job spec 'no/such/job.yaml'"),
        (["plan", "configs/demo.yaml", "--dry-run"], "error: --dry-run needs --devices"),
        (["plan", "configs/demo.yaml", "--dry-run", "--devices", "3xB200-1TB"], "error: "),
        (
            ["plan", "configs/demo.yaml", "--devices", "1xT4-16GB"],
            "error: --devices is only for --dry-run",
        ),
        (
            ["plan", "configs/demo.yaml", "--address", "127.0.0.1:1"],
            "error: cannot reach the Ray cluster at 127.0.0.1:1",
        ),
    ],
)
def test_user_errors_end_in_one_line_and_exit_2(args, message):
    result = autobatch(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


@pytest.mark.parametrize("as_json", [True, False], ids=["print", "rich"])
def test_a_reader_that_leaves_ends_the_output_quietly(as_json):
    read, write = os.pipe()
    os.close(read)  # as `autobatch ... | head` once head has what it wanted
    args = ["plan", "configs/demo.yaml", "--dry-run", "--devices", "2xA100-80GB,T4-16GB"]
    with os.fdopen(write, "w") as closed:
        done = subprocess.run(
            [sys.executable, "-m", "launcher.cli", *args, *(["--json"] if as_json else [])],
            cwd=ROOT, stdout=closed, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 1 and done.stderr == ""


def test_invalid_spec_names_the_field(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("name: j\nglobal_batch_size: -4\nmax_steps: 1\n")
    result = autobatch("plan", str(spec), "--json")
    assert result.returncode == 2
    assert "global_batch_size: Input should be greater than or equal to 1 (got -4)" in result.stderr


def test_dry_run_plans_declared_gpus_as_json_without_hardware(capsys, monkeypatch):
    from launcher.cli import main  # in this process: a subprocess costs seconds of imports

    monkeypatch.chdir(ROOT)
    args = ["plan", "configs/demo.yaml", "--dry-run", "--devices", "2xA100-80GB,4xT4-16GB"]
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["global_batch_size"] == 128
    assert sum(sum(r["micro_batches"]) for r in plan["ranks"]) == 128
    assert all(d["estimated"] for d in plan["inputs"])
    assert {d["name"] for d in plan["inputs"]} == {"A100-80GB", "T4-16GB"}
    assert plan["baseline"]["samples_per_s"] > 0 and 0 < plan["summary"]["efficiency"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, said",
    [
        ({"kind": "crash", "rank": 1, "step": 3}, "worker died"),
        ({"kind": "oom", "rank": None, "step": 3, "micro_step": "last"}, "micro-batch lowered"),
    ],
    ids=["kill-9", "oom-in-the-synced-step"],
)
def test_a_drill_under_autobatch_run_restarts_and_the_run_finishes(tmp_path, fault, said):
    # kill -9 of rank 1 at step 3 (its peers' gloo errors, text with '[' and ']', are
    # printed plainly), or an OOM in the synced micro-step of a rank that can be lowered:
    # the job restarts from the step-2 checkpoint, and the ledger shows every batch exact.
    import yaml
    from daemon_util import lowerable_rank, tiny_spec
    from test_launcher import assert_every_global_batch_exact, assert_restart_resumed_at

    spec = tiny_spec("drill")
    if fault["kind"] == "oom":
        fault = {**fault, "rank": lowerable_rank(spec, tmp_path)}
    spec["faults"] = [fault]
    spec.update(audit_samples=True, checkpoint={"dir": str(tmp_path / "ckpt"), "interval": 2})
    path = tmp_path / "drill.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = autobatch("run", str(path), "--runs-dir", str(tmp_path), "--json", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "restart 1: " in result.stdout and said in result.stdout
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["steps"] == 6 and summary["restarts"] == 1
    assert_every_global_batch_exact(spec, tmp_path / "ckpt")
    assert_restart_resumed_at(tmp_path / "ckpt", 2)
