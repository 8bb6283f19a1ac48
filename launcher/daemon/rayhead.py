"""The daemon's Ray: a local head in a process of its own, so jobs outlive the daemon.

    autobatch serve  ->  ensure_head(state_dir)  ->  python -m launcher.daemon.rayhead
                                                     (own session; ray.init(); waits)
    autobatch serve --shutdown  ->  stop_head(state_dir): SIGTERM, then SIGKILL to every
                                    process left in the head's session

An embedded Ray (started by `ray.init()` in the daemon) dies with the daemon and takes
every job with it; worse, on a SIGKILL its agents stay behind, orphaned, ignoring
SIGTERM. The head here is started once per state directory, in a new session (so a
signal to the daemon's process group does not reach it), and records its address and
pid in `<state>/ray-head.json`; a daemon that starts again finds it there. Everything
the head starts (GCS, raylet, agents, workers) stays in its session, which is how
`stop_head` finds what is left without touching any other Ray on the machine.
"""

from __future__ import annotations

import argparse
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

from launcher.errors import HeadError

HEAD_FILE = "ray-head.json"
NAMESPACE = "autobatch"
START_TIMEOUT_S = 90.0
# Ray gives its raylet 30 s to register with the GCS (fixed in Ray 2.60); on a busy machine
# that can pass, and the head exits: a new start usually makes it.
START_ATTEMPTS = 3


def head_file(state_dir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(state_dir) / HEAD_FILE


def running_head(state_dir: pathlib.Path) -> dict | None:
    """{pid, address} of this state directory's head when it runs and answers, else None."""
    try:
        head = json.loads(head_file(state_dir).read_text())
    except (OSError, ValueError):
        return None
    if not alive(head.get("pid", -1)) or not answers(head.get("address", "")):
        return None
    return head


def ensure_head(state_dir: pathlib.Path, num_cpus: int) -> str:
    """The address of this state directory's head, started (as its own process) if needed.
    A head whose process runs is given START_TIMEOUT_S to answer (a busy machine) before
    it is replaced: replacing it costs every job on it its run."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while (head := running_head(state_dir)) is None and _recorded_alive(state_dir):
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if head:
        return _connectable(head)
    stop_head(state_dir)  # a dead head's leftovers, if any
    deadline = time.monotonic() + START_TIMEOUT_S
    for attempt in range(1, START_ATTEMPTS + 1):
        proc = _spawn(state_dir, num_cpus)
        while (head := running_head(state_dir)) is None:
            if proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                _kill_session(proc.pid)  # it may not have recorded its pid yet
                stop_head(state_dir)
                raise HeadError(f"the Ray head did not start within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        if head:
            return _connectable(head)
        _kill_session(proc.pid)  # what the failed start left (it recorded no pid)
        if attempt == START_ATTEMPTS or time.monotonic() > deadline:
            break
    raise HeadError(
        f"the Ray head exited with status {proc.returncode} while starting ({attempt} "
        f"time(s)); see {pathlib.Path(state_dir) / 'ray-head.log'}"
    )


def _spawn(state_dir: pathlib.Path, num_cpus: int) -> subprocess.Popen:
    head_file(state_dir).unlink(missing_ok=True)
    log = (pathlib.Path(state_dir) / "ray-head.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.daemon.rayhead", str(state_dir), str(num_cpus)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        cwd=os.getcwd(),
    )  # fmt: skip
    log.close()
    return proc


def _connectable(head: dict) -> str:
    """The head's address, with this process set to authenticate as the head does: Ray
    turns token authentication on for a new local cluster unless RAY_AUTH_MODE says
    otherwise, but a driver that connects to it does not follow by itself."""
    mode = head.get("auth_mode", "disabled")
    if os.environ.get("RAY_AUTH_MODE") != mode:
        os.environ["RAY_AUTH_MODE"] = mode
        from ray._raylet import Config  # Ray caches its config: re-read, as ray.init does

        Config.initialize("")
    return head["address"]


def exposure_warning(state_dir: pathlib.Path) -> str | None:
    """What an operator must know when the head runs without Ray's token authentication.

    Ray 2.60 binds its servers on every interface of the node and turns a loopback node
    address given to `ray.init`/`ray start` into the node's own address, so the head
    cannot be held to 127.0.0.1; its token (on by default) is what keeps others out."""
    try:
        mode = json.loads(head_file(state_dir).read_text()).get("auth_mode", "disabled")
    except (OSError, ValueError, AttributeError):
        return None
    if mode != "disabled":
        return None
    return (
        "the Ray head runs with token authentication off (RAY_AUTH_MODE=disabled) and "
        "listens on every interface of this node: anyone who reaches this node's Ray "
        "ports can run code in it; unset RAY_AUTH_MODE, or keep the node's ports closed"
    )


def stop_head(state_dir: pathlib.Path, timeout_s: float = 30.0) -> list[int]:
    """Stop the state directory's head and every process it started; returns their pids."""
    try:
        pid = int(json.loads(head_file(state_dir).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
    left = session_processes(pid)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # the head's ray.shutdown() stops most of them
        deadline = time.monotonic() + timeout_s
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    _kill_session(pid)  # what ray.shutdown() leaves (its agents ignore SIGTERM)
    head_file(state_dir).unlink(missing_ok=True)
    return sorted(set(left) | {pid})


def _kill_session(sid: int) -> None:
    for _ in range(50):
        rest = session_processes(sid)
        if not rest:
            break
        for p in rest:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        time.sleep(0.1)


def session_processes(sid: int) -> list[int]:
    """Live processes (not zombies) of session `sid`, from the process table."""
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after "(comm)": state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(stat.parent.name))
    return found


def _recorded_alive(state_dir: pathlib.Path) -> bool:
    try:
        return alive(int(json.loads(head_file(state_dir).read_text())["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def answers(address: str, timeout_s: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError):
        return False
    return True


def _host(state_dir: pathlib.Path, num_cpus: int) -> None:
    """The head's process: start Ray, say where it is, wait for SIGTERM, stop Ray."""
    import ray

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(
        address="local",  # a new instance, even where another (`ray start`) runs here
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=200 * 2**20,
        namespace=NAMESPACE,
    )
    address = ray.get_runtime_context().gcs_address
    tmp = head_file(state_dir).with_suffix(".tmp")
    auth_mode = os.environ.get("RAY_AUTH_MODE", "disabled")  # ray.init sets it when it chose
    tmp.write_text(json.dumps({"pid": os.getpid(), "address": address, "auth_mode": auth_mode}))
    tmp.replace(head_file(state_dir))
    print(f"Ray head for {state_dir} at {address}", flush=True)
    while not stop.wait(1.0):
        pass
    ray.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the autobatch daemon's Ray head")
    parser.add_argument("state_dir", type=pathlib.Path)
    parser.add_argument("num_cpus", type=int)
    args = parser.parse_args()
    _host(args.state_dir.resolve(), args.num_cpus)
