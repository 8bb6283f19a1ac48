"""`autobatch serve`: the daemon's process: Ray, the job threads, the HTTP API (uvicorn).

Refuses to listen beyond loopback without a token. The HTTP server runs with the
guards of launcher.daemon.guards (connection cap, deadlines for request heads and
bodies). `run_jobs=False` (`--api-only`) serves the API and queues jobs but runs
none and starts no Ray: for tests and benchmarks of the API. SIGTERM/SIGINT stop it
gracefully (running jobs go back to the queue and resume at the next start);
SIGKILL loses nothing either (see launcher.daemon.daemon).
"""

from __future__ import annotations

import ipaddress
import os
import pathlib
import signal
import socket
import sys

from autobatch.errors import AutobatchError
from launcher.daemon.limits import Limits

DEFAULT_PORT = 8470


class ServeError(AutobatchError):
    """The daemon cannot start with these settings."""


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
    """Run the daemon until SIGTERM/SIGINT."""
    import uvicorn

    from launcher.daemon.api import create_app
    from launcher.daemon.daemon import Daemon
    from launcher.daemon.guards import uvicorn_config

    limits = limits or Limits()

    token = token or os.environ.get("AUTOBATCH_TOKEN") or None
    check_bind(host, token)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    port = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    daemon = Daemon(
        state_dir,
        address=address,
        num_cpus=num_cpus,
        checkpoint_root=checkpoint_root,
        task_modules=task_modules,
        data_roots=data_roots,
        metrics_url=f"http://{url_host}:{port}/metrics",
        run_jobs=run_jobs,
    )
    try:
        daemon.start()
        app = create_app(daemon, token=token, limits=limits)
        server = uvicorn.Server(uvicorn_config(app, limits, timeout_graceful_shutdown=5))
        print(
            f"autobatch daemon on http://{url_host}:{port} (state {pathlib.Path(state_dir)})",
            flush=True,
        )
        _keep_stop_signals()
        server.run(sockets=[sock])
    finally:
        daemon.shutdown()
    return 0


def _keep_stop_signals() -> None:
    """uvicorn stops on SIGTERM/SIGINT, then raises the signal again under the handler it
    found: with the default one the process died there, before daemon.shutdown(). This
    one lets serve() go on to stop the daemon."""

    def stopped(sig: int, frame: object) -> None:
        pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopped)


if __name__ == "__main__":
    sys.exit(serve())
