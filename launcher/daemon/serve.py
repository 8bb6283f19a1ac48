"""`autobatch serve`: a keeper process and the daemon's process (the job threads, the HTTP API).

    serve()       the keeper: the state directory's lock, the listening socket, signals;
                  it keeps a daemon process on them (launcher.daemon.keeper)
    run_daemon()  the daemon process: Daemon + uvicorn on the keeper's socket

Refuses to listen beyond loopback without a token, and a state directory another
daemon serves (a lock file held for the keeper's life). The HTTP server runs with
the guards of launcher.daemon.guards (connection cap, deadlines for request heads
and bodies). `run_jobs=False` (`--api-only`) serves the API and queues jobs but runs
none and starts no Ray: for tests and benchmarks of the API. SIGTERM/SIGINT stop the
daemon, SIGKILL kills it: either way its jobs run on, on their supervisors and the
state directory's Ray head, and the next start re-attaches (launcher.daemon.daemon).
`autobatch serve --shutdown` (`shutdown`) stops the daemon, its head and its jobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import os
import pathlib
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from launcher.daemon.limits import Limits
from launcher.errors import ServeError

DEFAULT_PORT = 8470
_BACKLOG = 2048  # uvicorn's


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise ServeError(
            f"--host {host} is not a loopback address: refusing to serve without a token; "
            "set --token or AUTOBATCH_TOKEN (clients send it as Authorization: Bearer)"
        )


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    state_dir: str = "autobatch-state",
    address: str | None = None,
    token: str | None = None,
    num_cpus: int = 16,
    checkpoint_root: str | None = None,
    task_modules: tuple[str, ...] = (),
    data_roots: tuple[str, ...] = (),
    run_jobs: bool = True,
    limits: Limits | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT: this process keeps the state directory's lock
    and the listening socket, and a daemon process serving on them (launcher.daemon.keeper)."""
    from launcher.daemon import keeper

    limits = limits or Limits()
    lock = _lock_state_dir(pathlib.Path(state_dir))
    try:
        token = token or os.environ.get("AUTOBATCH_TOKEN") or None
        check_bind(host, token)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        sock.listen(_BACKLOG)  # from here on a connection waits, even between daemon processes
        port = sock.getsockname()[1]
        url_host = f"[{host}]" if ":" in host else host
        settings = {
            "state_dir": state_dir, "address": address, "num_cpus": num_cpus,
            "checkpoint_root": checkpoint_root, "task_modules": list(task_modules),
            "data_roots": list(data_roots), "run_jobs": run_jobs,
            "metrics_url": f"http://{url_host}:{port}/metrics",
            "limits": dataclasses.asdict(limits),
        }  # fmt: skip
        argv = [sys.executable, "-m", "launcher.daemon.serve", "--child", json.dumps(settings)]
        if token:  # to the daemon process in the environment, not on a command line
            os.environ["AUTOBATCH_TOKEN"] = token

        def ready() -> None:
            print(
                f"autobatch daemon on http://{url_host}:{port} (state {pathlib.Path(state_dir)})",
                flush=True,
            )

        # A standby daemon process (imports done, ~350 MB) takes over within a second
        # when one ends: only a daemon that runs jobs loses Ray.
        return keeper.keep(argv, sock, standby=run_jobs, on_ready=ready)
    finally:
        lock.close()


def run_daemon(sock: socket.socket, ready: Callable[[], None], settings: dict[str, Any]) -> int:
    """The daemon process: the job threads and the HTTP API on `sock`, until SIGTERM (0) or
    until its Ray is lost (keeper.RESTART: a Ray driver whose raylet died cannot be trusted
    again, and Ray may end the process itself at any call; the keeper starts a new one)."""
    import uvicorn

    from launcher.daemon import keeper
    from launcher.daemon.api import create_app
    from launcher.daemon.daemon import Daemon
    from launcher.daemon.guards import uvicorn_config

    limits = Limits(**settings.pop("limits"))
    token = os.environ.get("AUTOBATCH_TOKEN") or None
    for key in ("task_modules", "data_roots"):
        settings[key] = tuple(settings[key])
    daemon = Daemon(**settings)
    app = create_app(daemon, token=token, limits=limits)
    server = uvicorn.Server(uvicorn_config(app, limits, timeout_graceful_shutdown=5))
    lost = False

    def ray_lost() -> None:  # from the daemon's scheduling thread
        nonlocal lost
        lost = True
        server.should_exit = True  # requests under way are answered; new ones wait

    daemon.on_ray_lost = ray_lost
    try:
        # Ray connects in the daemon's thread while the API already answers (/healthz
        # says what it waits for); FastAPI is imported above, before that thread starts.
        daemon.start()
        _keep_stop_signals()
        ready()
        server.run(sockets=[sock])
    finally:
        daemon.shutdown(lost=lost)
    return keeper.RESTART if lost else 0


def shutdown(state_dir: str = "autobatch-state", address: str | None = None) -> int:
    """Stop the daemon serving `state_dir` (if one does), then every job it started: its
    Ray head (or, on the cluster at `address`, the jobs' supervisors). The jobs go back
    to the queue, to resume from their last checkpoint at the next start."""
    from launcher.daemon import rayhead, supervisor
    from launcher.daemon.daemon import Daemon
    from launcher.daemon.store import ACTIVE

    state = pathlib.Path(state_dir).resolve()
    if not (state / "jobs.db").exists():
        raise ServeError(f"{state} is not a daemon's state directory (no jobs.db there)")
    pid = _lock_holder(state)
    if pid:
        _stop_process(pid)
        print(f"stopped the daemon (pid {pid})", flush=True)
    daemon = Daemon(state, run_jobs=False)
    active = daemon.store.list(ACTIVE)
    address = address or os.environ.get("RAY_ADDRESS")
    if address and active:
        from launcher.job import cluster

        cluster.connect(address)
        for rec in active:
            if (sup := supervisor.find(rec.id)) is not None:
                supervisor.reap(sup)
    elif not address:
        stopped = rayhead.stop_head(state)
        if stopped:
            print(f"stopped the Ray head and its {len(stopped)} process(es)", flush=True)
    for rec in active:
        daemon.requeue(rec, "stopped by `autobatch serve --shutdown`")
        print(f"{rec.id}: queued, resumes at the next start", flush=True)
    daemon.store.close()
    return 0


LOCK_FILE = "daemon.lock"


def _lock_state_dir(state: pathlib.Path):  # noqa: ANN202 - the open lock file
    """Hold the state directory's lock for the process's life (released when it dies)."""
    state.mkdir(parents=True, exist_ok=True)
    f = (state / LOCK_FILE).open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise ServeError(
            f"another daemon (pid {holder}) serves {state}; stop it with "
            f"`autobatch serve --shutdown --state-dir {state}`, or use another --state-dir"
        ) from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def _lock_holder(state: pathlib.Path) -> int | None:
    """The pid of the daemon holding the state directory's lock, if one does."""
    path = state / LOCK_FILE
    if not path.exists():
        return None
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            return int(f.read().strip() or 0) or None
        return None


def _stop_process(pid: int, timeout_s: float = 60.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _exists(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.1)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _keep_stop_signals() -> None:
    """uvicorn stops on SIGTERM/SIGINT, then raises the signal again under the handler it
    found: with the default one the process died there, before daemon.shutdown(). This
    one lets serve() go on to stop the daemon."""

    def stopped(sig: int, frame: object) -> None:
        pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopped)


def _child_main(argv: list[str]) -> int:
    """`python -m launcher.daemon.serve --child SETTINGS --fd N --ready M --keeper PID`: the
    daemon process a keeper starts (launcher.daemon.keeper), never run by hand."""
    import argparse

    from launcher.daemon import keeper

    parser = argparse.ArgumentParser(prog="launcher.daemon.serve")
    parser.add_argument("--child", required=True, help="the daemon's settings (JSON)")
    parser.add_argument("--fd", type=int, required=True, help="the listening socket")
    parser.add_argument("--ready", type=int, required=True, help="a pipe: 1 when serving")
    parser.add_argument("--keeper", type=int, required=True, help="the keeper's pid")
    parser.add_argument("--go", type=int, help="a standby: serve once a byte arrives here")
    args = parser.parse_args(argv)
    keeper.die_with_keeper(args.keeper)
    sock = socket.socket(fileno=args.fd)
    if args.go is not None:
        import launcher.daemon.api  # noqa: F401 - the imports (seconds) done before the go
        import launcher.daemon.daemon  # noqa: F401

        with os.fdopen(args.go, "rb") as go:
            if go.read(1) != b"1":  # the keeper is gone: so are we, by then
                return 0

    def ready() -> None:
        os.write(args.ready, b"1")
        os.close(args.ready)

    code = run_daemon(sock, ready, json.loads(args.child))
    if code == keeper.RESTART:  # Ray's exit hook (ray.shutdown) may wait on the lost head
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
