"""`autobatch serve`'s keeper: a small process that holds the port and keeps a daemon on it.

    autobatch serve (the keeper: the state directory's lock, the listening socket, signals)
      └── python -m launcher.daemon.serve --child  (the daemon: API, scheduler, Ray driver)
            exits RESTART (75): it lost its Ray    -> a new daemon process, at once
            dies any other way (Ray's quick exit)  -> a new one (after 1, 2, 4 ... 30 s
                                                      while they keep dying young)
            exits after SIGTERM from the keeper    -> the keeper exits

Why a second process: the daemon is a Ray driver, and a driver whose local raylet died
exits its whole process from inside Ray ("Exiting because the Raylet IPC connection
failed and the local Raylet is dead"), in whichever Ray call finds out first. The
daemon cannot keep Ray out of its process (its jobs are followed through Ray), so the
process that holds the listening socket is this one, which never imports Ray: while a
daemon process is replaced, connections wait in the socket's backlog and are answered
by the next one (slowly, not refused). Everything the daemon knows is in SQLite under
the state directory, so a new daemon process picks it all up (launcher.daemon.daemon).

The daemon process is in a process group of its own (a Ctrl-C reaches the keeper, which
stops it once), and dies with the keeper (PR_SET_PDEATHSIG): killing the keeper kills
the daemon, leaving nothing behind; stopping it (SIGTERM, SIGINT) stops the daemon
first. Linux only, as Ray's local heads are.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

RESTART = 75  # the daemon's exit status when its Ray was lost: start a new one now
MIN_UPTIME_S = 60.0  # a daemon process that lived less than this died young
MAX_BACKOFF_S = 30.0
STOP_TIMEOUT_S = 90.0  # a daemon stopping waits for its job threads (30 s) and uvicorn (5 s)
_PR_SET_PDEATHSIG = 1


def keep(
    argv: list[str],
    sock: socket.socket,
    *,
    standby: bool = True,
    on_ready: Callable[[], None] = lambda: None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> int:
    """Run `argv` (a daemon process; it is given `--fd N --ready M --keeper PID`, and a
    standby also `--go G`) until SIGTERM/SIGINT, starting a new one each time one ends.
    `standby`: keep the next daemon process started and waiting, so that it serves within
    a second of the last one's end. The first one failing before it is ready is the
    keeper's failure (its exit status is returned: a setting it refused, a state
    directory it cannot use)."""
    stop = _StopSignals()
    current, spare = _Child.start(argv, sock, standby=False), None
    ready_once, delay = False, 0.0
    try:
        while True:
            ready = current.wait_ready(stop)
            if ready and not ready_once:
                ready_once = True
                on_ready()
            if ready and standby and spare is None:
                spare = _Child.start(argv, sock, standby=True)
            code = current.wait_exit(stop)
            if stop.requested:
                return 0
            if not ready_once:
                return code if code > 0 else 1
            lived = time.monotonic() - current.started
            delay = 0.0 if lived >= MIN_UPTIME_S else min(max(1.0, 2 * delay), MAX_BACKOFF_S)
            why = "its Ray was lost" if code == RESTART else f"status {_status(code)}"
            log(
                f"autobatch serve: the daemon process (pid {current.proc.pid}) exited ({why}) "
                f"after {lived:.1f} s; starting a new one" + (f" in {delay:.0f} s" if delay else "")
            )
            if delay and stop.wait(delay):
                return 0
            current.stop()  # its pipes
            if spare is not None and spare.go():
                current, spare = spare, None
                continue
            if spare is not None:  # it died waiting
                spare.stop()
                spare = None
            current = _Child.start(argv, sock, standby=False)
    finally:
        for child in (current, spare):
            if child is not None:
                child.stop()
        stop.restore()


class _Child:
    """A daemon process: its pipe to say it serves, and a standby's pipe to tell it to."""

    def __init__(self, proc: subprocess.Popen, ready_r: int, go_w: int | None) -> None:
        self.proc, self.ready_r, self.go_w = proc, ready_r, go_w
        self.started = time.monotonic()

    @classmethod
    def start(cls, argv: list[str], sock: socket.socket, *, standby: bool) -> _Child:
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe() if standby else (None, None)
        fd = sock.fileno()
        args = [*argv, "--fd", str(fd), "--ready", str(ready_w), "--keeper", str(os.getpid())]
        args += ["--go", str(go_r)] if go_r is not None else []
        try:
            proc = subprocess.Popen(
                args, pass_fds=tuple(f for f in (fd, ready_w, go_r) if f is not None),
                stdin=subprocess.DEVNULL, process_group=0,
            )  # fmt: skip
        finally:
            for f in (ready_w, go_r):
                if f is not None:
                    os.close(f)
        return cls(proc, ready_r, go_w)

    def go(self) -> bool:
        """Tell a standby to serve; False if it is gone."""
        if self.proc.poll() is not None or self.go_w is None:
            return False
        try:
            os.write(self.go_w, b"1")
        except BrokenPipeError:
            return False
        os.close(self.go_w)
        self.go_w = None
        self.started = time.monotonic()
        return True

    def wait_ready(self, stop: _StopSignals) -> bool:
        """Until it says it serves (True), or exits first (False)."""
        while not stop.requested:
            readable, _, _ = select.select([self.ready_r], [], [], 0.2)
            if readable:
                return os.read(self.ready_r, 1) == b"1"  # b"": it exited (the pipe closed)
        return False

    def wait_exit(self, stop: _StopSignals) -> int:
        while self.proc.poll() is None and not stop.requested:
            stop.wait(0.2)
        return self.proc.wait() if not stop.requested else 0

    def stop(self) -> None:
        """SIGTERM (by its pid), SIGKILL if it is still there after STOP_TIMEOUT_S."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.ready_r, self.go_w):
            if f is not None:
                with contextlib.suppress(OSError):
                    os.close(f)
        self.ready_r, self.go_w = -1, None


def _status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"{code}, {signal.Signals(-code).name}"
    return str(code)


class _StopSignals:
    """SIGTERM and SIGINT ask the keeper to stop (it stops its daemon process first)."""

    def __init__(self) -> None:
        self.requested = False
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._old = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)
        }

    def _handle(self, sig: int, frame: object) -> None:
        self.requested = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._w, b"x")

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, less if a stop is asked for; whether one was."""
        if not self.requested:
            select.select([self._r], [], [], seconds)
        return self.requested

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        os.close(self._r)
        os.close(self._w)


def die_with_keeper(keeper_pid: int) -> None:
    """In the daemon process: be killed when the keeper dies (SIGKILL to it, the OOM
    killer), and exit now if it is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != keeper_pid:  # it died before the line above
        os._exit(1)
