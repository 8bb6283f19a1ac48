"""Closed-loop balance in the ranks: a device slower than the probe saw makes the job switch,
between two steps, to a split of the same global batch that fits the speeds measured, and
the run stays the same run.

- three gloo ranks (float64): the ranks' measured compute, one all-gather per window and
  the same new plan on every rank; every global batch exact and the parameters equal the
  open-loop run's to 1e-10;
- `autobatch run` as a subprocess: a device that trains at a quarter of the speed it probed
  (`slow` from step 0) is rebalanced, the CLI says so, the ledger is exact (slow);
- `autobatch serve`: the same fault from step 3; the rebalance is in the job's record, its
  log, `autobatch status` and /metrics; the parameters equal the open-loop job's (float32,
  relative 1e-5) (slow).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch
from distributed import run_ranks
from test_accumulate import mlp, regression_data, sample_loss

from autobatch.planning.capacity import DeviceCapacity
from autobatch.planning.planner import make_plan
from autobatch.planning.sampler import GlobalBatchSampler
from autobatch.step.accumulate import Accumulator
from launcher.job.rebalancing import ComputeClock, Rebalancer

ROOT = pathlib.Path(__file__).resolve().parents[1]

# -- three gloo ranks, float64 ------------------------------------------------------------

N, B, STEPS, SLOW = 96, 24, 16, 2  # dataset, global batch, steps, the rank slower than probed
PROBED = [DeviceCapacity(f"d{i}", "cpu", 16, 0.001, 0.0001) for i in range(3)]  # alike


def train(rank: int, world_size: int, rebalance: bool) -> dict:
    """STEPS AdamW steps of a float64 MLP; rank SLOW sleeps 4 ms a sample in its forward (its
    device is slower than the probe saw). Returns the parameters, the rebalances, and the
    indices each step trained on."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = mlp(torch.float64)
    acc = Accumulator(DDP(model), torch.optim.AdamW(model.parameters(), lr=1e-2))
    x, y = regression_data(N, torch.float64)
    sampler = GlobalBatchSampler(N, B, seed=3)
    plan = make_plan(B, PROBED, keep_all=True)
    clock = ComputeClock(model, torch.device("cpu"))
    balance = Rebalancer(window=3, enabled=rebalance)

    def loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        if rank == SLOW:
            time.sleep(0.004 * len(batch[0]))
        return sample_loss(model, batch)

    timed, steps = clock.wrap(loss), []
    for step in range(STEPS):
        if balance.due():
            plan = balance.decide(plan, step, torch.device("cpu")) or plan
        clock.start_step()
        micro = sampler.micro_batches(plan, rank)
        result = acc.step([(x[i], y[i]) for i in micro], timed, global_items=B)
        spans = clock.step_compute(len(result.micro_step_s))
        measured = [w if c is None else c for c, w in zip(spans, result.micro_step_s)]
        predicted = sum(plan.capacity(rank).micro_step_time(len(i)) for i in micro)
        balance.observe(sum(measured), predicted)
        steps.append(sorted(int(i) for idx in micro for i in idx))
        sampler.advance()
    params = [p.detach().clone() for p in model.parameters()]
    return {"params": params, "rebalances": balance.history, "steps": steps}


def closed_and_open(rank: int, world_size: int) -> dict[bool, dict]:
    return {rebalance: train(rank, world_size, rebalance) for rebalance in (True, False)}


@pytest.fixture(scope="module")
def gloo_runs() -> dict[bool, list[dict]]:
    """Per rebalance setting, what each of the three ranks returned."""
    ranks = run_ranks(closed_and_open, 3)
    return {rebalance: [r[rebalance] for r in ranks] for rebalance in (True, False)}


def test_a_rank_slower_than_probed_is_rebalanced_alike_on_every_rank(gloo_runs):
    closed = gloo_runs[True]
    history = closed[0]["rebalances"]
    assert history, "no rebalance: the slow rank held every step back"
    assert all(r["rebalances"] == history for r in closed)  # the same decision everywhere
    first = history[0]
    assert first["after_s"] < first["before_s"] * 0.9
    shares = [sum(mb) for mb in first["micro_batches"]]
    assert sum(shares) == B and shares[SLOW] < B // 3  # the slow rank got less
    assert max(first["ratios"]) == first["ratios"][SLOW]
    assert gloo_runs[False][0]["rebalances"] == []  # rebalance off: the probe's plan


def test_every_global_batch_is_exact_and_the_run_is_the_open_loop_run(gloo_runs):
    sampler = GlobalBatchSampler(N, B, seed=3)
    closed, opened = gloo_runs[True], gloo_runs[False]
    for step in range(STEPS):
        got = sorted(i for r in closed for i in r["steps"][step])
        assert got == sorted(sampler.global_batch(step).tolist()), f"step {step}"
    for got, want in zip(closed[0]["params"], opened[0]["params"]):
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-10


# -- the spec's fields, at the API's edge ---------------------------------------------------


@pytest.fixture
def api(tmp_path):
    import httpx
    from daemon_util import api_in_thread

    from launcher.daemon.daemon import Daemon

    daemon = Daemon(tmp_path / "state", run_jobs=False)
    daemon.start()
    try:
        with api_in_thread(daemon) as url, httpx.Client(base_url=url, timeout=30) as http:
            yield http
    finally:
        daemon.shutdown()


FAULT = {"kind": "slow", "rank": 0, "step": 3}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        # the switch has two values
        ({"rebalance": "on"}, "rebalance: Input should be 'auto' or 'off'"),
        # a gain of 0 would switch on noise; 1 never
        ({"rebalance_threshold": 0}, "rebalance_threshold: Input should be greater than 0"),
        ({"rebalance_threshold": 1}, "rebalance_threshold: Input should be less than 1"),
        # a window is at least two steps
        ({"rebalance_window": 1}, "rebalance_window: Input should be greater than or equal to 2"),
        # slow needs its factor, in (0, 1]; the other faults take none
        (
            {"faults": [FAULT]},
            "faults.0: factor=None with kind 'slow': kind slow needs factor",
        ),
        (
            {"faults": [{**FAULT, "factor": 2}]},
            "faults.0.factor: Input should be less than or",
        ),
        (
            {"faults": [{**FAULT, "kind": "crash", "factor": 0.5}]},
            "factor=0.5 with kind 'crash': kind slow needs factor",
        ),
    ],
)
def test_bad_rebalance_fields_answer_422_naming_the_field(api, fields, message):
    from daemon_util import tiny_spec

    r = api.post("/v1/jobs", json=tiny_spec(**fields))
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]


# -- through the launcher -----------------------------------------------------------------

# Three devices alike (one profile: an equal split), a model whose time grows with the
# micro-batch; rank 0 trains at a quarter of the speed it probed.
MODEL = {"dataset_size": 96, "seq_len": 64, "d_model": 64, "n_heads": 2, "n_layers": 2,
         "vocab_size": 16}  # fmt: skip
GLOBAL_BATCH = 48  # 16 a rank: its per-sample time counts beside the fixed cost


def drill_spec(name: str, device: str, slow_from: int, **over: object) -> dict:
    return {
        "name": name,
        "task_args": MODEL,
        "global_batch_size": GLOBAL_BATCH,
        "max_steps": 18,
        "optimizer": {"name": "adamw", "lr": 0.01},
        "devices": {
            "select": "simulated",
            "keep_all": True,
            "simulated": [{"name": device, "memory": "64MiB", "speed": 1.0, "count": 3}],
        },
        "checkpoint": {"interval": 100},
        "audit_samples": True,
        "seed": 1,
        "rebalance_window": 4,  # one step of the four may be disturbed (two jobs share 2 cores)
        "faults": [{"kind": "slow", "rank": 0, "step": slow_from, "factor": 0.25}],
        **over,
    }


def cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow
def test_autobatch_run_rebalances_a_device_slower_than_probed_and_every_batch_is_exact(tmp_path):
    import yaml
    from test_launcher import assert_every_global_batch_exact

    spec = drill_spec("slowrun", "sim-x", slow_from=0)
    spec["checkpoint"]["dir"] = str(tmp_path / "ckpt")
    path = tmp_path / "drill.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "AUTOBATCH_PROFILE_CACHE": str(tmp_path / "profiles")}
    result = cli("run", str(path), "--runs-dir", str(tmp_path), "--json", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rebalanced from step " in result.stdout, result.stdout[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("\n{") :])
    plan = summary["plan"]
    assert plan["notes"][-1].startswith("rebalanced:")
    shares = [sum(r["micro_batches"]) for r in plan["ranks"]]
    assert sum(shares) == GLOBAL_BATCH and shares[0] < GLOBAL_BATCH // 3  # rank 0 gave some
    assert_every_global_batch_exact(spec, tmp_path / "ckpt")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from daemon_util import DaemonProcess

    d = DaemonProcess(tmp_path_factory.mktemp("d") / "state", tmp_path_factory.mktemp("prof"))
    yield d
    d.stop()


def _job_metrics(daemon, job_id: str) -> dict[str, float]:
    """The job's rebalances and its ranks' measured compute, from the daemon's /metrics."""
    found = {}
    for line in daemon.http.get("/metrics").text.splitlines():
        name = line.split("{", 1)[0]
        if f'job_id="{job_id}"' in line and name in (
            "autobatch_rebalances_total",
            "autobatch_rank_compute_seconds",
            "autobatch_plan_predicted_compute_seconds",
        ):
            found[name] = max(found.get(name, 0.0), float(line.split()[-1]))
    return found


@pytest.mark.slow
def test_a_daemon_job_slowed_at_a_step_is_rebalanced_in_its_record_and_metrics(daemon):
    from test_launcher import assert_every_global_batch_exact, assert_same_parameters

    from launcher.job.checkpoint import load_checkpoint

    # The same drill with rebalancing off, on devices of its own: the open-loop run.
    specs = {
        "closed": drill_spec("closed", "sim-x", slow_from=3, max_steps=24),
        "open": drill_spec("open", "sim-y", slow_from=3, max_steps=24, rebalance="off"),
    }
    jobs = {kind: daemon.submit(spec) for kind, spec in specs.items()}
    seen, deadline = {}, time.monotonic() + 240
    while daemon.job(jobs["closed"])["state"] not in ("succeeded", "failed"):
        for name, value in _job_metrics(daemon, jobs["closed"]).items():  # gone at its end
            seen[name] = max(seen.get(name, 0.0), value)
        assert time.monotonic() < deadline, "the closed-loop job did not finish"
        time.sleep(0.1)
    recs = {kind: daemon.wait_state(job, "succeeded", timeout_s=240) for kind, job in jobs.items()}
    rebalances = recs["closed"]["rebalances"]
    assert rebalances and rebalances[0]["step"] > 3, rebalances
    first = rebalances[0]
    assert first["after_s"] < first["before_s"]
    assert sum(first["micro_batches"][0]) < GLOBAL_BATCH // 3  # the slow rank 0 gave some away
    assert seen.get("autobatch_rebalances_total", 0) >= 1, f"/metrics never showed it: {seen}"
    assert seen["autobatch_rank_compute_seconds"] > 0
    assert seen["autobatch_plan_predicted_compute_seconds"] > 0
    assert not recs["open"]["rebalances"]
    log = daemon.http.get(f"/v1/jobs/{jobs['closed']}/logs", params={"tail": 0}).text
    assert f"rebalanced from step {first['step']}" in log
    status = cli("status", jobs["closed"], "--server", daemon.url, env=daemon.env)
    assert f"rebalanced from step {first['step']}" in status.stdout, status.stdout
    params = {}
    for kind, rec in recs.items():
        ckpt = pathlib.Path(rec["spec"]["checkpoint"]["dir"])
        assert_every_global_batch_exact(specs[kind], ckpt)
        params[kind] = load_checkpoint(ckpt / "step_00000024.pt")["model"]
    assert_same_parameters(params["closed"], params["open"])
