"""Talking to the daemon: `DaemonClient` (httpx) and the `serve`, `submit`, `jobs`, `status`,
`cancel`, `logs` subcommands.

The server comes from --server or AUTOBATCH_SERVER (default http://127.0.0.1:8470),
the token from --token or AUTOBATCH_TOKEN. Every failure is a `ClientError` with one
line: the daemon's own reason when it answered, what to check when it did not.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx

from launcher.errors import ClientError, DaemonUnreachable

DEFAULT_SERVER = "http://127.0.0.1:8470"


class DaemonClient:
    def __init__(
        self, server: str | None = None, *, token: str | None = None, timeout_s: float = 60.0
    ) -> None:
        self.server = (server or os.environ.get("AUTOBATCH_SERVER") or DEFAULT_SERVER).rstrip("/")
        token = token or os.environ.get("AUTOBATCH_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout_s)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise DaemonUnreachable(
                f"cannot reach the autobatch daemon at {self.server}: {exc}; start it with "
                "`autobatch serve` or point --server / AUTOBATCH_SERVER at it"
            ) from None
        _check(response)
        return response

    def submit(self, spec_text: str, *, yaml: bool = True) -> str:
        ctype = "application/yaml" if yaml else "application/json"
        body = spec_text.encode()
        return self._request(
            "POST", "/v1/jobs", content=body, headers={"Content-Type": ctype}
        ).json()["id"]

    def jobs_page(
        self, state: str | None = None, *, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page of GET /v1/jobs: {"jobs": [...], "next_cursor": str | None}."""
        params = {"state": state, "limit": limit, "cursor": cursor}
        params = {k: v for k, v in params.items() if v is not None}
        return self._request("GET", "/v1/jobs", params=params).json()

    def jobs(
        self, state: str | None = None, *, limit: int | None = None, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Jobs in queue order, following pages: all of them, or the first `limit`; and the
        cursor where the listing stopped (None: nothing more)."""
        rows: list[dict[str, Any]] = []
        while limit is None or len(rows) < limit:
            want = None if limit is None else min(limit - len(rows), 1000)
            page = self.jobs_page(state, limit=want, cursor=cursor)
            rows += page["jobs"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        return rows, cursor

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> str:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()["state"]

    def logs(self, job_id: str, tail: int = 200) -> str:
        return self._request("GET", f"/v1/jobs/{job_id}/logs", params={"tail": tail}).text

    def follow(self, job_id: str, tail: int = 200, *, retry_s: float = 300.0) -> Iterator[str]:
        """The job log's lines as they are written, until the job ends. A daemon that
        restarts meanwhile (the stream breaks, or ends before the job did) is reconnected
        to for up to `retry_s`, and the log goes on after the last line handed out."""
        last: str | None = None  # the last line handed out: where a reconnect picks up
        lost_at: float | None = None
        while True:
            try:
                for line in self._follow_once(job_id, tail if last is None else 0, last):
                    last, lost_at = line, None
                    yield line
                if self.job(job_id)["state"] in ("succeeded", "failed", "cancelled"):
                    return
            except (httpx.TransportError, DaemonUnreachable) as exc:
                lost_at = lost_at or time.monotonic()
                if time.monotonic() - lost_at > retry_s:
                    raise ClientError(
                        f"lost the log stream from {self.server} and could not reconnect "
                        f"within {retry_s:.0f} s: {exc}"
                    ) from None
                print(f"(the daemon at {self.server} went away: reconnecting)", file=sys.stderr)
            time.sleep(1.0)

    def _follow_once(self, job_id: str, tail: int, after: str | None) -> Iterator[str]:
        """One streamed request; with `after`, the lines up to and including that one are
        skipped (the whole log is asked for: `tail` 0)."""
        params = {"tail": tail, "follow": "true"}
        skipping = after is not None
        with self._http.stream(
            "GET", f"/v1/jobs/{job_id}/logs", params=params, timeout=None
        ) as response:
            if response.is_error:
                response.read()
                _check(response)
            for line in response.iter_lines():
                if skipping:
                    skipping = line + "\n" != after
                    continue
                yield line + "\n"

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text

    def wait(self, job_id: str, states: tuple[str, ...], timeout_s: float = 120) -> dict:
        """Poll until the job is in one of `states`; ClientError on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            rec = self.job(job_id)
            if rec["state"] in states:
                return rec
            if time.monotonic() > deadline:
                raise ClientError(
                    f"job {job_id} is still {rec['state']} after {timeout_s:.0f} s "
                    f"(waited for {', '.join(states)}); last error: {rec['last_error']}"
                )
            time.sleep(0.2)


def _check(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    if not isinstance(detail, str):  # FastAPI's own 422s: a list of errors
        detail = "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in detail
        )
    raise ClientError(f"{response.status_code}: {detail}")


# ---------------------------------------------------------------------------
# the subcommands


def _client(args: argparse.Namespace) -> DaemonClient:
    return DaemonClient(args.server, token=args.token)


def cmd_serve(args: argparse.Namespace) -> int:
    from launcher.daemon.serve import serve, shutdown

    if args.shutdown:
        return shutdown(args.state_dir, args.address)
    return serve(
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        address=args.address,
        token=args.token,
        num_cpus=args.num_cpus,
        checkpoint_root=args.checkpoint_root,
        task_modules=tuple(args.task_module or ()),
        data_roots=tuple(args.data_root or ()),
        run_jobs=not args.api_only,
    )


def cmd_submit(args: argparse.Namespace) -> int:
    path = pathlib.Path(args.spec)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ClientError(f"cannot read job spec {str(path)!r}: {exc.strerror}") from None
    job_id = _client(args).submit(text, yaml=path.suffix != ".json")
    print(job_id)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    rows, cursor = _client(args).jobs(args.state, limit=args.limit, cursor=args.cursor)
    more = (
        f"more jobs: autobatch jobs --cursor {cursor}"
        f"{f' --limit {args.limit}' if args.limit else ''}"
        f"{f' --state {args.state}' if args.state else ''}"
    )
    if args.json:
        print(json.dumps(rows, indent=2))
        if cursor is not None:
            print(more, file=sys.stderr)
        return 0
    print(f"{'ID':<28} {'STATE':<11} {'STEP':>11} {'RESTARTS':>8}  LAST ERROR")
    for r in rows:
        step = f"{r['step'] if r['step'] is not None else '-'}/{r['total_steps'] or '-'}"
        print(
            f"{r['id']:<28} {r['state']:<11} {step:>11} {r['restarts']:>8}  {r['last_error'] or ''}"
        )
    if cursor is not None:
        print(more, file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    rec = _client(args).job(args.id)
    if args.json:
        print(json.dumps(rec, indent=2))
        return 0
    progress = rec.get("progress") or {}
    print(
        f"{rec['id']}: {rec['state']}, step {progress.get('step', '-')}/"
        f"{progress.get('total_steps', '-')}, restarts {rec['restarts']}"
    )
    if rec["last_error"]:
        print(f"last error: {rec['last_error']}")
    for t in rec["transitions"]:
        at = time.strftime("%H:%M:%S", time.localtime(t["at"]))
        print(f"  {at} {t['from_state'] or '-':>10} -> {t['to_state']:<10} {t['reason']}")
    for r in rec.get("resizes") or []:
        at = time.strftime("%H:%M:%S", time.localtime(r["at"]))
        print(
            f"  {at} resized {r['before']} -> {r['devices']} from step {r['step']} "
            f"({r['seconds']:.1f} s): {r['why']}"
        )
    for r in rec.get("rebalances") or []:
        at = time.strftime("%H:%M:%S", time.localtime(r["at"]))
        print(
            f"  {at} rebalanced from step {r['step']}: predicted step "
            f"{r['before_s'] * 1e3:.1f} -> {r['after_s'] * 1e3:.1f} ms, samples per rank "
            f"{[sum(mb) for mb in r['micro_batches']]}"
        )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    print(f"{args.id}: {_client(args).cancel(args.id)}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    if not args.follow:
        sys.stdout.write(client.logs(args.id, args.tail))
        return 0
    for chunk in client.follow(args.id, args.tail):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def add_commands(sub: Any) -> None:
    """Register the daemon's subcommands on the `autobatch` parser's subparsers."""
    from launcher.daemon.serve import DEFAULT_PORT

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--server", help=f"daemon URL (default: AUTOBATCH_SERVER, else {DEFAULT_SERVER})"
        )
        p.add_argument("--token", help="API token (default: AUTOBATCH_TOKEN)")

    s = sub.add_parser("serve", help="run the launcher daemon (HTTP API, queue, metrics)")
    s.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    s.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any)"
    )
    s.add_argument("--state-dir", default="autobatch-state", help="SQLite, job logs, checkpoints")
    s.add_argument(
        "--address",
        help="Ray address (default: RAY_ADDRESS, else a local Ray head of the state directory's "
        "own, started once and kept for the jobs when the daemon stops)",
    )
    s.add_argument("--token", help="require this bearer token (default: AUTOBATCH_TOKEN)")
    s.add_argument("--num-cpus", type=int, default=16, help="logical CPUs of the local Ray head")
    s.add_argument(
        "--checkpoint-root", help="checkpoints stay under it (default: STATE_DIR/checkpoints)"
    )
    s.add_argument(
        "--data-root",
        action="append",
        help="a directory tasks may read models and data from (repeat; default: the current one)",
    )
    s.add_argument(
        "--task-module", action="append", help="allow tasks from this module prefix (repeat)"
    )
    s.add_argument(
        "--api-only",
        action="store_true",
        help="serve the API and queue jobs, but run none and start no Ray (tests, benchmarks)",
    )
    s.add_argument(
        "--shutdown",
        action="store_true",
        help="stop the daemon of --state-dir and everything it started (its Ray head, so its "
        "jobs: they resume from their checkpoints at the next start), then exit",
    )
    s.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "submit", help="submit a job spec (YAML or .json) to the daemon; prints its id"
    )
    p.add_argument("spec")
    common(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list the daemon's jobs (every page, or --limit)")
    p.add_argument("--state", help="only jobs in this state")
    p.add_argument("--limit", type=_positive, help="at most this many (default: all)")
    p.add_argument("--cursor", help="start after this cursor (printed when more are left)")
    p.add_argument("--json", action="store_true")
    common(p)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("status", help="one job: state, progress, transitions")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel a job (stops its actors, frees its devices)")
    p.add_argument("id")
    common(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("logs", help="a job's log")
    p.add_argument("id")
    p.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    p.add_argument("--tail", type=int, default=200, help="last N lines (default 200)")
    common(p)
    p.set_defaults(func=cmd_logs)
