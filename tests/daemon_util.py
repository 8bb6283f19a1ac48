"""Helpers for the daemon tests: the API served in a thread, the daemon as a subprocess."""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn

from launcher.daemon.api import create_app
from launcher.daemon.daemon import Daemon
from launcher.daemon.guards import uvicorn_config
from launcher.daemon.limits import Limits
from launcher.daemon.rayhead import session_processes, stop_head

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = {
    "dataset_size": 96,
    "seq_len": 12,
    "d_model": 16,
    "n_heads": 2,
    "n_layers": 1,
    "vocab_size": 16,
}


def tiny_spec(name: str = "tiny", sims: tuple[str, ...] = ("big", "mid", "small"), **over) -> dict:
    """A job of three simulated devices (speeds 1, 0.5, 0.25) training a 1-layer GPT."""
    # Memory large enough that no rank runs out: the daemon tests are not about OOM
    # (tests/test_launcher.py is).
    memory = {"big": "64MiB", "mid": "32MiB", "small": "16MiB"}
    speed = {"big": 1.0, "mid": 0.5, "small": 0.25}
    spec = {
        "name": name,
        "task_args": TINY,
        "global_batch_size": 24,
        "max_steps": 6,
        "optimizer": {"name": "adamw", "lr": 0.01},
        "devices": {
            "select": "simulated",
            "keep_all": True,
            "simulated": [
                {"name": f"sim-{s}", "memory": memory[kind], "speed": speed[kind]}
                for s in sims
                for kind in [s.rstrip("0123456789")]
            ],
        },
        "checkpoint": {"interval": 2},
        "seed": 1,
    }
    spec.update(over)
    return spec


@contextlib.contextmanager
def api_in_thread(
    daemon: Daemon, token: str | None = None, limits: Limits | None = None
) -> Iterator[str]:
    """The daemon's app on a free loopback port, served by uvicorn in a thread (with the
    guards `autobatch serve` has); yields its URL."""
    limits = limits or Limits()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(create_app(daemon, token=token, limits=limits), limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class DaemonProcess:
    """`autobatch serve` as a subprocess on a free loopback port; its Ray head (unless
    --api-only) is a process of its own, which `stop` ends too."""

    def __init__(self, state_dir: pathlib.Path, profile_cache: pathlib.Path, *args: str) -> None:
        env = dict(os.environ)
        env.update(AUTOBATCH_PROFILE_CACHE=str(profile_cache))
        # Ray's own default, as a user's shell has it: token authentication for a new head
        env.pop("RAY_AUTH_MODE", None)
        env.pop("RAY_ADDRESS", None)
        env.pop("AUTOBATCH_TOKEN", None)
        self.env, self.state_dir = env, state_dir
        self.log = (state_dir.parent / f"{state_dir.name}-daemon.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", "serve", "--port", "0",
             "--state-dir", str(state_dir), "--num-cpus", "16", *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self.log,
        )  # fmt: skip
        line = self.proc.stdout.readline().decode()  # "autobatch daemon on http://..."
        if "daemon on http://" not in line:  # leave no Ray head behind a failed start
            self.kill()
            stop_head(state_dir)
            raise AssertionError(f"daemon did not start: {line!r}; see {self.log.name}")
        self.url = line.split(" on ")[1].split()[0]
        self.http = httpx.Client(base_url=self.url, timeout=30)
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 180) -> None:
        """Until /healthz says ok: the API answers before the daemon's Ray is connected
        (starting a head takes long on a busy machine), and jobs run only after."""
        deadline = time.monotonic() + timeout_s
        health = None
        while True:
            with contextlib.suppress(httpx.TransportError):
                answer = self.http.get("/healthz")
                health = answer.json() if answer.status_code == 200 else answer.status_code
                if isinstance(health, dict) and health["status"] == "ok":
                    return
            assert time.monotonic() < deadline, f"daemon not ready: /healthz said {health}"
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL to `autobatch serve`: no clean-up at all. Its daemon process dies with it
        (launcher.daemon.keeper); waited for here, so the port and state are free after."""
        daemons = children(self.proc.pid)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in daemons):
            assert time.monotonic() < deadline, f"daemon processes {daemons} outlived their keeper"
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (the jobs run on), then the documented stop: `serve --shutdown`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        subprocess.run(
            [sys.executable, "-m", "launcher.cli", "serve", "--shutdown",
             "--state-dir", str(self.state_dir)],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=self.log, timeout=120, check=True,
        )  # fmt: skip
        self.http.close()
        self.log.close()

    def submit(self, spec: dict) -> str:
        r = self.http.post("/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job(self, job_id: str) -> dict:
        r = self.http.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id: str, pred, what: str, timeout_s: float = 120) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            rec = self.job(job_id)
            if pred(rec):
                return rec
            assert rec["state"] not in ("failed",), rec["last_error"]
            assert time.monotonic() < deadline, f"{job_id}: {what} not reached: {rec['state']}"
            time.sleep(0.2)

    def wait_state(self, job_id: str, *states: str, timeout_s: float = 120) -> dict:
        return self.wait(job_id, lambda r: r["state"] in states, f"state {states}", timeout_s)


def children(pid: int) -> list[int]:
    """The live child processes of `pid`."""
    found = []
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill_head(state_dir: pathlib.Path) -> dict:
    """kill -9 of the state directory's Ray head and every process it started (its
    session, by pid); returns the head's record (pid, address)."""
    head = json.loads((state_dir / "ray-head.json").read_text())
    for pid in [head["pid"], *session_processes(head["pid"])]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return head


class ApiWatch:
    """Polls the daemon's /healthz and one job's record from a thread, each request on a
    new connection with a deadline, and keeps every answer or failure with its time: what
    a monitoring probe and a user would have seen."""

    def __init__(self, url: str, job_id: str, timeout_s: float = 30.0) -> None:
        self.url, self.job_id, self.timeout_s = url, job_id, timeout_s
        self.seen: list[tuple[float, float, str, object]] = []  # (start, seconds, what, got)
        self.job: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ApiWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s + 5)

    def _get(self, path: str) -> object:
        t0 = time.monotonic()
        try:
            r = httpx.get(self.url + path, timeout=self.timeout_s)
            got: object = r.json() if r.status_code == 200 else f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            got = exc
        self.seen.append((t0, time.monotonic() - t0, path, got))
        return got

    def _run(self) -> None:
        while not self._stop.is_set():
            self._get("/healthz")
            job = self._get(f"/v1/jobs/{self.job_id}")
            if isinstance(job, dict):
                self.job = job
            self._stop.wait(0.1)

    def failures(self) -> list[tuple[float, float, str, object]]:
        return [s for s in self.seen if not isinstance(s[3], dict)]

    def longest_wait(self) -> float:
        """The longest time from a request's start to the next answer that came back."""
        answered = sorted(t0 + dt for t0, dt, _, got in self.seen if isinstance(got, dict))
        waits = [0.0]
        for t0, _, _, _ in self.seen:
            i = bisect.bisect_left(answered, t0)
            waits.append(answered[i] - t0 if i < len(answered) else float("inf"))
        return max(waits)


def transition_time(rec: dict, to_state: str) -> float:
    return next(t["at"] for t in rec["transitions"] if t["to_state"] == to_state)


def lowerable_rank(spec: dict, tmp: pathlib.Path, env: dict | None = None) -> int:
    """A rank whose planned micro-batch is above 1, from `autobatch plan` on the same profile
    cache as the run that follows (so the same plan): an OOM drill must hit a rank that can
    be lowered. A tiny model's time is mostly fixed cost, so a plan may rightly give one
    rank a single sample, and an OOM there ends the job (nothing left to lower)."""
    import yaml

    path = tmp / "plan-first.yaml"
    path.write_text(yaml.safe_dump({**spec, "faults": []}))
    out = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "plan", str(path), "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    ranks = json.loads(out.stdout)["ranks"]
    return max(range(len(ranks)), key=lambda r: max(ranks[r]["micro_batches"]))
