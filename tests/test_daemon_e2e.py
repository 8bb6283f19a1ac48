"""`autobatch serve` end to end: a subprocess on a free loopback port with its own local Ray
head, real jobs of three simulated devices, a real Prometheus scraping it, jobs outliving a
SIGKILLed daemon, `serve --shutdown`.

Slow (about two minutes on two cores): `pytest -m "not slow"` skips it.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from daemon_util import (
    ROOT,
    ApiWatch,
    DaemonProcess,
    kill_head,
    lowerable_rank,
    tiny_spec,
    transition_time,
)
from prometheus_util import prometheus
from test_launcher import assert_every_global_batch_exact

from autobatch.metrics.prometheus import METRIC_NAMES
from launcher.daemon.rayhead import session_processes
from launcher.job.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow
DASHBOARD = ROOT / "k8s" / "grafana" / "autobatch-dashboard.json"


@pytest.fixture(scope="module")
def profiles(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("profiles")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, profiles) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("d") / "state", profiles)
    yield d
    d.stop()


def test_a_job_runs_to_success_and_its_log_follows_it(daemon):
    job_id = daemon.submit(tiny_spec("first"))
    follow = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "logs", job_id, "-f", "--server", daemon.url],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert follow.returncode == 0, follow.stderr
    assert "plan:" in follow.stdout and "step 6/6" in follow.stdout
    assert " succeeded: 6 steps in " in follow.stdout.rstrip().splitlines()[-1]
    rec = daemon.job(job_id)
    assert rec["state"] == "succeeded" and rec["restarts"] == 0
    assert [t["to_state"] for t in rec["transitions"]] == [
        "queued", "probing", "running", "succeeded",
    ]  # fmt: skip
    assert rec["summary"]["steps"] == 6 and rec["plan"]["summary"]["world_size"] == 3
    assert rec["progress"]["step"] == 6


def test_a_failing_job_ends_failed_with_its_reason_and_frees_its_devices(daemon):
    # No restarts allowed and rank 1 killed at step 1: the job fails; the next job on the
    # same simulated devices starts after it and succeeds.
    crash = [{"kind": "crash", "rank": 1, "step": 1}]
    bad = daemon.submit(tiny_spec("bad", max_restarts=0, faults=crash))
    good = daemon.submit(tiny_spec("good", max_steps=2))
    rec = daemon.wait_state(bad, "failed", timeout_s=180)
    assert "failed after 0 restart(s)" in rec["last_error"]
    assert "rank 1 worker died" in rec["last_error"]
    assert rec["transitions"][-1]["to_state"] == "failed"
    assert rec["transitions"][-1]["reason"] == rec["last_error"]
    after = daemon.wait_state(good, "succeeded", timeout_s=180)
    assert transition_time(after, "probing") >= transition_time(rec, "failed")


def test_drills_as_daemon_jobs_a_kill_9_and_an_oom_restart_and_every_batch_is_exact(
    daemon, tmp_path
):
    oom_rank = lowerable_rank(tiny_spec("drill"), tmp_path, daemon.env)  # the daemon's cache
    drills = {
        "worker died": {"kind": "crash", "rank": 1, "step": 3},
        "micro-batch lowered": {"kind": "oom", "rank": oom_rank, "step": 3, "micro_step": "last"},
    }
    specs = {
        said: tiny_spec("drill", max_steps=6, faults=[fault], audit_samples=True)
        for said, fault in drills.items()
    }
    jobs = {said: daemon.submit(spec) for said, spec in specs.items()}
    for said, job in jobs.items():
        rec = daemon.wait_state(job, "succeeded", timeout_s=240)
        assert rec["restarts"] == 1, rec["transitions"]
        reasons = [t["reason"] for t in rec["transitions"] if t["to_state"] == "restarting"]
        assert said in reasons[0], reasons
        assert_every_global_batch_exact(specs[said], pathlib.Path(rec["spec"]["checkpoint"]["dir"]))


def test_jobs_on_the_same_devices_run_one_after_the_other_disjoint_ones_together(daemon):
    a = daemon.submit(tiny_spec("a", sims=("big", "mid", "small"), max_steps=6))
    b = daemon.submit(tiny_spec("b", sims=("big", "mid", "small"), max_steps=2))
    c = daemon.submit(tiny_spec("c", sims=("big3", "mid3", "small3"), max_steps=2))
    recs = {j: daemon.wait_state(j, "succeeded", timeout_s=180) for j in (a, b, c)}
    a_end = transition_time(recs[a], "succeeded")
    assert transition_time(recs[b], "probing") >= a_end  # waited for a's devices
    assert transition_time(recs[c], "probing") < a_end  # started while a ran
    b_queued = recs[b]["transitions"][1]
    assert b_queued["to_state"] == "probing" and "all 3 device(s) free" in b_queued["reason"]


def dashboard_queries() -> list[str]:
    """Every query of the dashboard, with Grafana's variables as Prometheus would see them."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return [e.replace("$__rate_interval", "1m").replace("$job_id", ".*") for e in exprs]


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="no prometheus binary")
def test_prometheus_scrapes_every_dashboard_query_then_cancel_frees_the_devices(daemon, tmp_path):
    sims = ("big2", "mid2", "small2")
    long = daemon.submit(tiny_spec("long", sims=sims, max_steps=100_000))
    daemon.wait(long, lambda r: (r["progress"] or {}).get("step", 0) >= 2, "2 steps")
    text = daemon.http.get("/metrics").text
    # per-rank memory series, labelled with the job id
    for rank in range(3):
        assert re.search(
            rf'autobatch_torch_memory_peak_bytes{{job_id="{long}",rank="{rank}",[^}}]*}} \d', text
        ), text[:2000]
    if shutil.which("promtool"):
        check = subprocess.run(
            ["promtool", "check", "metrics"], input=text.encode(), capture_output=True
        )
        assert check.returncode == 0, check.stdout + check.stderr

    target = {
        "job_name": "autobatch",
        "scrape_interval": "1s",
        "static_configs": [{"targets": [daemon.url.removeprefix("http://")]}],
    }
    with prometheus(target, tmp_path) as prom:
        pending, deadline = dashboard_queries(), time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            time.sleep(1)
            answers = {q: prom.get("/api/v1/query", params={"query": q}).json() for q in pending}
            for q, a in answers.items():
                assert a["status"] == "success", (q, a)
            pending = [q for q, a in answers.items() if not a["data"]["result"]]
        assert not pending, f"dashboard queries with no series: {pending}"
        up = prom.get("/api/v1/query", params={"query": "up"}).json()["data"]["result"]
        assert [r["value"][1] for r in up] == ["1"]

    waiting = daemon.submit(tiny_spec("waiting", sims=sims, max_steps=3))
    time.sleep(2)
    assert daemon.job(waiting)["state"] == "queued"  # its devices are busy
    r = daemon.http.post(f"/v1/jobs/{long}/cancel", timeout=60)
    assert r.json() == {"id": long, "state": "cancelled"}
    done = daemon.wait_state(waiting, "succeeded", timeout_s=120)
    assert transition_time(done, "probing") >= transition_time(daemon.job(long), "cancelled")
    assert daemon.job(long)["transitions"][-1]["reason"] == "cancelled by request while running"
    assert f'job_id="{long}"' not in daemon.http.get("/metrics").text  # its ranks were dropped


def _rank_processes(state: pathlib.Path) -> list[int]:
    """The job ranks' worker processes (process title ray::DeviceWorker...) of the head."""
    head = json.loads((state / "ray-head.json").read_text())["pid"]
    found = []
    for pid in session_processes(head):
        try:
            if b"DeviceWorker" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def test_cancel_stops_a_running_jobs_ranks(daemon):
    job = daemon.submit(tiny_spec("stopme", sims=("big3", "mid3", "small3"), max_steps=100_000))
    daemon.wait(job, lambda r: (r["progress"] or {}).get("step", 0) >= 2, "2 steps")
    assert len(_rank_processes(daemon.state_dir)) >= 3
    t0 = time.monotonic()
    r = daemon.http.post(f"/v1/jobs/{job}/cancel", timeout=60)
    answered = time.monotonic() - t0
    assert r.json() == {"id": job, "state": "cancelled"}
    while left := _rank_processes(daemon.state_dir):  # ray.kill ends them asynchronously
        assert time.monotonic() - t0 < 30, f"ranks still running: {left}"
        time.sleep(0.05)
    stopped = time.monotonic() - t0
    print(f"cancel answered after {answered:.2f} s; every rank stopped after {stopped:.2f} s")


def test_every_dashboard_metric_is_one_the_daemon_exports():
    exported = set(METRIC_NAMES) | {
        f"autobatch_step_duration_seconds_{s}" for s in ("bucket", "sum", "count")
    }
    used = {m for q in dashboard_queries() for m in re.findall(r"autobatch_[a-z_]+", q)}
    assert used and used <= exported, used - exported


def _step(rec: dict) -> int:
    return (rec["progress"] or {}).get("step", 0)


def test_a_sigkilled_daemon_costs_no_step_its_successor_reattaches_and_shutdown_leaves_nothing(
    tmp_path, profiles
):
    state = tmp_path / "state"
    # ~15 steps/s here: long enough to outlast the daemon's restart
    spec = tiny_spec("survivor", max_steps=400, checkpoint={"interval": 100}, audit_samples=True)
    first = DaemonProcess(state, profiles)
    head = json.loads((state / "ray-head.json").read_text())
    try:
        job = first.submit(spec)
        queued = first.submit(tiny_spec("later", max_steps=2))  # same devices: waits
        seen = [_step(first.wait(job, lambda r: _step(r) >= 4, "4 steps"))]
    finally:
        first.kill()
    second = DaemonProcess(state, profiles)
    try:
        assert json.loads((state / "ray-head.json").read_text()) == head  # the same Ray
        exported = False
        while (rec := second.job(job))["state"] not in ("succeeded", "failed", "queued"):
            seen.append(_step(rec))
            exported |= f'job_id="{job}"' in second.http.get("/metrics").text
            time.sleep(0.2)
        assert rec["state"] == "succeeded", rec["transitions"]
        assert rec["restarts"] == 0 and rec["progress"]["step"] == 400
        assert [t["to_state"] for t in rec["transitions"]] == [
            "queued", "probing", "running", "succeeded",
        ]  # fmt: skip
        assert seen == sorted(seen) and seen[1] < 400, seen  # still running when re-attached
        assert exported  # its ranks' metrics reach the new daemon
        log = second.http.get(f"/v1/jobs/{job}/logs", params={"tail": 0}).text
        after = log.split("re-attached to the job's supervisor")[1]
        assert "step 400/400" in after and "resuming from" not in log
        ckpt = pathlib.Path(rec["spec"]["checkpoint"]["dir"])
        assert_every_global_batch_exact(spec, ckpt)
        ledger = [json.loads(x) for p in ckpt.glob("samples-rank*.jsonl") for x in p.open()]
        assert {e["attempt"] for e in ledger} == {0}  # one attempt: nothing re-run
        later = second.wait_state(queued, "succeeded", timeout_s=120)
        assert transition_time(later, "probing") >= transition_time(rec, "succeeded")
    finally:
        second.stop()  # SIGTERM, then `autobatch serve --shutdown`
    assert first.proc.returncode is not None and second.proc.returncode is not None
    assert session_processes(head["pid"]) == []  # the head and all it started are gone
    assert not (state / "ray-head.json").exists()


def test_a_job_whose_supervisor_died_resumes_from_its_checkpoint_and_says_so(tmp_path, profiles):
    state = tmp_path / "state"
    d = DaemonProcess(state, profiles)
    try:
        job = d.submit(tiny_spec("orphan", max_steps=300, checkpoint={"interval": 10}))
        d.wait(job, lambda r: _step(r) >= 4, "4 steps")
        d.proc.send_signal(signal.SIGTERM)  # the daemon stops; the job runs on
        d.proc.wait(60)
    finally:
        subprocess.run(
            [sys.executable, "-m", "launcher.cli", "serve", "--shutdown", "--state-dir",
             str(state)], cwd=ROOT, env=d.env, check=True, timeout=120, capture_output=True,
        )  # fmt: skip
    second = DaemonProcess(state, profiles)
    try:
        rec = second.wait_state(job, "succeeded", timeout_s=180)
        reasons = [t["reason"] for t in rec["transitions"]]
        stopped = [r for r in reasons if r.startswith("stopped by `autobatch serve --shutdown`")]
        assert len(stopped) == 1, reasons
        resumed_at = int(re.search(r"resuming from checkpoint step_(\d+)\.pt", stopped[0])[1])
        assert 10 <= resumed_at < 300
        ckpt = pathlib.Path(rec["spec"]["checkpoint"]["dir"])
        log = second.http.get(f"/v1/jobs/{job}/logs", params={"tail": 0}).text
        assert f"resuming from {ckpt}/step_{resumed_at:08d}.pt" in log  # resumed, not restarted
        assert list_checkpoints(ckpt)[-1].name == "step_00000300.pt"
    finally:
        second.stop()


def test_an_elastic_job_shrinks_for_a_queued_job_then_grows_back(daemon, tmp_path):
    """A long elastic job on three devices gives one up to a short job that needs it, and
    takes it back when the short job is done: every global batch exact, the step never
    going back, each resize in its status with the reason and in /metrics."""
    sims = ("big4", "mid4", "small4")
    spec = tiny_spec("elastic", sims=sims, max_steps=100_000, audit_samples=True)
    spec["devices"]["min_count"] = 1
    long = daemon.submit(spec)
    daemon.wait(long, lambda r: (r["progress"] or {}).get("step", 0) >= 2, "2 steps")
    short = daemon.submit(tiny_spec("short", sims=("big4",), max_steps=3))
    steps, world = [], set()  # (resizes done, world size on /metrics) seen while polling

    def look(r) -> int:
        steps.append((r["progress"] or {}).get("step", 0))
        m = re.search(rf'autobatch_job_world_size{{job_id="{long}"}} (\d+)', metrics())
        world.add((len(r["resizes"] or []), m and int(m.group(1))))
        return len(r["resizes"] or [])

    def metrics() -> str:
        return daemon.http.get("/metrics").text

    daemon.wait(long, lambda r: look(r) >= 1, "a shrink", timeout_s=120)
    done = daemon.wait_state(short, "succeeded", timeout_s=180)
    daemon.wait(long, lambda r: look(r) >= 2 and (2, 3) in world, "a grow", timeout_s=120)
    assert (1, 2) in world, world  # measured by the ranks: 2 while shrunk, 3 after
    rec = daemon.job(long)
    shrank, grew = rec["resizes"]
    assert (shrank["reason"], shrank["before"], shrank["devices"]) == ("shrank", [0, 1, 2], [1, 2])
    assert shrank["why"] == f"shrank for job {short}"
    assert (grew["reason"], grew["before"], grew["devices"]) == ("grew", [1, 2], [0, 1, 2])
    assert grew["why"].startswith("grew into freed devices")
    assert transition_time(done, "probing") >= shrank["at"] - shrank["seconds"]
    assert grew["at"] >= transition_time(done, "succeeded")
    assert shrank["step"] < grew["step"] and steps == sorted(steps)  # never back
    text = metrics()
    for reason, n in [("shrank", 1), ("grew", 1)]:
        assert f'autobatch_resizes_total{{job_id="{long}",reason="{reason}"}} {n}' in text
    status = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "status", long, "--server", daemon.url],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert f"shrank for job {short}" in status.stdout and "grew into" in status.stdout, status
    daemon.http.post(f"/v1/jobs/{long}/cancel", timeout=60)
    rec = daemon.job(long)  # the steps it reported were done; a later one may be cut short
    ledger = pathlib.Path(rec["spec"]["checkpoint"]["dir"])
    assert_every_global_batch_exact(spec, ledger, through=rec["progress"]["step"])


# The longest the API may take to answer while its daemon process is replaced: the old one
# finishes the requests under way, the keeper's standby (imports done) serves; connections
# wait in the socket's backlog meanwhile. Measured: 2 s at a load of 20 on two cores. A
# new process without a standby would import torch, Ray and FastAPI first: 5 s idle, 20 s
# at a load of 7.
API_WAIT_S = 15.0


def test_a_lost_ray_head_is_replaced_and_the_job_resumes_while_the_api_answers(tmp_path, profiles):
    """kill -9 of every process of the daemon's Ray head mid-job: `autobatch serve` (the same
    pid) answers throughout, never refusing a connection, says what it waits for, starts a
    new head, and the job resumes from its checkpoint and succeeds with every global batch
    exact."""
    state = tmp_path / "state"
    spec = tiny_spec("headless", max_steps=100, checkpoint={"interval": 10}, audit_samples=True)
    d = DaemonProcess(state, profiles)
    try:
        job = d.submit(spec)
        d.wait(job, lambda r: _step(r) >= 12, "12 steps")
        with ApiWatch(d.url, job, timeout_s=API_WAIT_S) as watch:
            time.sleep(0.5)  # answers before the loss, too
            head = kill_head(state)
            deadline = time.monotonic() + 300
            while (watch.job or {}).get("state") != "succeeded":
                assert (watch.job or {}).get("state") != "failed", watch.job["last_error"]
                assert time.monotonic() < deadline, (watch.job or {}).get("transitions")
                assert d.proc.poll() is None, "autobatch serve exited"
                time.sleep(0.2)
        rec = watch.job
        failures = watch.failures()
        print(f"the API through the head's loss: {len(watch.seen)} requests, the longest wait "
              f"{watch.longest_wait():.2f} s, failed: {failures}")  # fmt: skip
        refused = [f for f in failures if isinstance(f[3], httpx.ConnectError)]
        assert not refused, refused  # the socket never closed
        # Only a request in flight when a daemon process died can be cut: one at most.
        assert len(failures) <= 1, failures
        assert watch.longest_wait() < API_WAIT_S, watch.longest_wait()
        waited = {got["waiting_for"] for _, _, what, got in watch.seen
                  if what == "/healthz" and isinstance(got, dict)}  # fmt: skip
        assert any(waited - {None}), "/healthz never said what the daemon waited for"
        assert int((state / "daemon.lock").read_text()) == d.proc.pid  # the same serve
        assert json.loads((state / "ray-head.json").read_text())["pid"] != head["pid"]
        assert rec["restarts"] == 1 and rec["last_error"] is None  # the re-queue, counted
        reasons = [t["reason"] for t in rec["transitions"]]
        lost = [r for r in reasons if "Ray head" in r and "lost" in r]
        assert len(lost) == 1 and "resuming from checkpoint" in lost[0], reasons
        assert_every_global_batch_exact(spec, pathlib.Path(rec["spec"]["checkpoint"]["dir"]))
    finally:
        d.stop()
    assert session_processes(head["pid"]) == []


def test_logs_follow_reconnects_to_a_restarted_daemon_and_repeats_no_line(tmp_path, profiles):
    """`autobatch logs -f` outlives a SIGKILLed daemon: it reconnects to the next one on the
    same address and goes on after the last line it printed, to the job's end."""
    from distributed import free_port

    state, port = tmp_path / "state", str(free_port())
    spec = tiny_spec("followed", max_steps=200, checkpoint={"interval": 50})
    first = DaemonProcess(state, profiles, "--port", port)
    follower = None
    try:
        job = first.submit(spec)
        follower = subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", "logs", job, "-f", "--server", first.url],
            cwd=ROOT, env=first.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        first.wait(job, lambda r: _step(r) >= 4, "4 steps")
    finally:
        first.kill()
    second = DaemonProcess(state, profiles, "--port", port)
    try:
        assert second.url == first.url
        out, err = follower.communicate(timeout=600)
        assert follower.returncode == 0, err[-2000:]
        assert "reconnecting" in err
        lines = out.splitlines()
        assert "step 200/200" in out and len(lines) == len(set(lines)), out[-2000:]
        assert any(line.split(" ", 1)[1].startswith("succeeded:") for line in lines)
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
        second.stop()


def test_a_cancel_while_probing_answers_the_final_state(daemon):
    """A job whose probe would take many minutes (a 0.0001-speed device) is cancelled while
    probing: the answer is the final state, within the daemon's 30 s wait for it."""
    crawl = [{"name": "sim-crawl", "memory": "64MiB", "speed": 0.0001}]
    spec = tiny_spec("crawl", devices={"select": "simulated", "simulated": crawl})
    job = daemon.submit(spec)
    logs = f"/v1/jobs/{job}/logs"
    daemon.wait(job, lambda r: "phase probing" in daemon.http.get(logs).text, "the probe")
    t0 = time.monotonic()
    r = daemon.http.post(f"/v1/jobs/{job}/cancel")
    seconds = time.monotonic() - t0
    assert r.status_code == 200 and r.json()["state"] == "cancelled", (r.text, seconds)
    rec = daemon.job(job)
    assert [t["to_state"] for t in rec["transitions"]][-2:] == ["probing", "cancelled"]
