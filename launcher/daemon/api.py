"""The daemon's HTTP JSON API (FastAPI): jobs, logs, health, metrics; OpenAPI at /openapi.json.

    POST /v1/jobs                 a job spec (JSON, or YAML with a yaml content type) -> id
    GET  /v1/jobs                 jobs in queue order, a page at a time (?state=running
                                  &limit=100&cursor=<next_cursor of the previous page>)
    GET  /v1/jobs/{id}            state, plan, progress, restarts, last error, transitions,
                                  an elastic job's resizes (reason, devices, step, seconds)
    POST /v1/jobs/{id}/cancel     stop the job's actors, free its devices
    GET  /v1/jobs/{id}/logs       the job log (?tail=N, 0: all; ?follow=true streams until it ends)
    GET  /healthz                 liveness (never needs the token)
    GET  /metrics                 Prometheus exposition: job states and every running rank

No request can cost the daemon more than `Limits` allows (launcher.daemon.limits):
the connection, token and body guards wrap the app (launcher.daemon.guards); a
body is parsed in worker processes (launcher.daemon.body) and validated in a small
pool of threads, never on the event loop. Reads of bounded size (a page of jobs,
one record) run on the loop through the store's own read connection, which never
waits for a writer; files and everything else run in threads. Invalid specs answer
422 with the field path of each problem, a spec the daemon would store over
`max_spec_bytes` 413, unknown ids 404.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import pydantic_core
from fastapi import FastAPI, Query, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from pydantic import BaseModel

from launcher.daemon.body import BodyParser
from launcher.daemon.daemon import Daemon
from launcher.daemon.guards import BearerAuth, BodyCap
from launcher.daemon.limits import Limits
from launcher.daemon.store import STATES, TERMINAL
from launcher.errors import BodyError, InvalidSpec, JobStateError, UnknownJob
from launcher.job.spec import JobSpec

State = Literal["queued", "probing", "running", "restarting", "succeeded", "failed", "cancelled"]
assert tuple(State.__args__) == STATES  # the Literal and the store agree
_CHUNK = 64 << 10  # log files are read and sent this much at a time
_MAX_ERRORS, _MAX_DETAIL = 50, 8192  # what a 422 lists of an invalid spec's problems


class JobBrief(BaseModel):
    """One row of GET /v1/jobs."""

    id: str
    name: str
    state: State
    created: float
    updated: float
    step: int | None
    total_steps: int | None
    restarts: int
    last_error: str | None


class JobPage(BaseModel):
    """GET /v1/jobs: one page of jobs in queue order."""

    jobs: list[JobBrief]
    # give it as ?cursor= for the next page; null on the last page
    next_cursor: str | None


def create_app(daemon: Daemon, *, token: str | None = None, limits: Limits | None = None) -> Any:
    """The ASGI application: FastAPI routes inside the auth and body guards."""
    limits = limits or Limits()
    app = FastAPI(title="autobatch daemon", version="1", docs_url=None, redoc_url=None)
    reads = daemon.store.reader()  # bounded reads (a page, a record) on the loop
    parser = BodyParser(limits.parse_workers)
    parser.start()
    specs = ThreadPoolExecutor(limits.parse_workers, thread_name_prefix="api-spec")

    @app.exception_handler(UnknownJob)
    async def _unknown(request: Request, exc: UnknownJob) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(InvalidSpec)
    async def _invalid(request: Request, exc: InvalidSpec) -> JSONResponse:
        detail, errors = str(exc), exc.errors[:_MAX_ERRORS]  # 10,000 unknown keys: 10,000 errors
        if len(detail) > _MAX_DETAIL or len(exc.errors) > _MAX_ERRORS:
            detail = f"{detail[:_MAX_DETAIL]} ... ({len(exc.errors)} problems in all)"
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(BodyError)
    async def _body(request: Request, exc: BodyError) -> JSONResponse:
        errors = [{"loc": exc.loc, "msg": str(exc)}]
        return JSONResponse({"detail": str(exc), "errors": errors}, status_code=exc.status)

    @app.exception_handler(JobStateError)
    async def _conflict(request: Request, exc: JobStateError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.post("/v1/jobs", status_code=201, openapi_extra=_spec_body())
    async def submit(request: Request) -> dict[str, str]:
        body, ctype = await request.body(), request.headers.get("content-type", "")
        data = await parser.parse(body, ctype, limits)
        loop = asyncio.get_running_loop()
        job_id = await loop.run_in_executor(specs, _submit, daemon, data, limits)
        return {"id": job_id, "state": "queued"}

    @app.get("/v1/jobs", response_model=JobPage)
    async def jobs(
        state: State | None = None,
        limit: int = Query(limits.default_page, ge=1, le=limits.max_page),
        cursor: str | None = Query(
            None, pattern=r"^[0-9]{1,18}$", description="next_cursor of the previous page"
        ),
    ) -> Response:
        # Read and serialised here, on the loop: a listing is the hot path (bench_daemon.py).
        rows, after = reads.page(state, limit=limit, after=int(cursor or 0))
        page = {"jobs": rows, "next_cursor": None if after is None else str(after)}
        return Response(_json(page), media_type="application/json")

    @app.get("/v1/jobs/{job_id}")
    async def job(job_id: str) -> Response:
        return Response(_json(reads.record(job_id)), media_type="application/json")

    @app.post("/v1/jobs/{job_id}/cancel")
    async def cancel(job_id: str) -> dict[str, str]:
        state = await asyncio.to_thread(daemon.cancel, job_id)
        return {"id": job_id, "state": state}

    @app.get("/v1/jobs/{job_id}/logs", response_class=PlainTextResponse)
    async def logs(
        job_id: str, tail: int = Query(200, ge=0, le=100_000), follow: bool = False
    ) -> Response:
        path = await asyncio.to_thread(daemon.log_path, job_id)
        start = await asyncio.to_thread(_tail_start, path, tail)  # tail=0: the whole log
        return StreamingResponse(
            _stream_log(daemon, job_id, path, start, follow), media_type="text/plain; charset=utf-8"
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        waiting = daemon.link.waiting_for
        return {"status": "waiting" if waiting else "ok", "running": len(daemon.running),
                "waiting_for": waiting}  # fmt: skip

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        body = await asyncio.to_thread(daemon.sink.render)
        return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            defs = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(defs.pop("$defs", {}))
            components["JobSpec"] = defs
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return BodyCap(BearerAuth(app, token), limits)


def _spec_body() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}},
                "application/yaml": {"schema": {"type": "string"}},
            },
        }
    }


def _submit(daemon: Daemon, data: Any, limits: Limits) -> str:
    """Validate, bound and queue one parsed spec (in a worker thread); the job's id."""
    spec = daemon.validate(data)
    size = len(spec.model_dump_json())
    if size > limits.max_spec_bytes:
        raise BodyError(
            f"the job spec is {size} bytes as JSON (with its defaults); the daemon stores at "
            f"most {limits.max_spec_bytes} (max_spec_bytes)",
            status=413,
        )
    return daemon.submit(spec)


def _json(value: Any) -> bytes:
    """Strict JSON; NaN and infinities (a diverged loss in `progress`) become null."""
    try:
        return pydantic_core.to_json(value, inf_nan_mode="null")
    except (pydantic_core.PydanticSerializationError, ValueError):  # rows from before the limits
        return json.dumps(value, default=str).encode()


def _tail_start(path: pathlib.Path, lines: int) -> int:
    """The offset where the last `lines` lines of the file begin (0: the whole file)."""
    if lines == 0 or not path.exists():
        return 0
    with path.open("rb") as f:
        end = pos = f.seek(0, os.SEEK_END)
        found = 0
        while pos > 0:
            start = max(0, pos - _CHUNK)
            f.seek(start)
            block = f.read(pos - start)
            i = len(block)
            while (i := block.rfind(b"\n", 0, i)) >= 0:
                if start + i != end - 1:  # the newline that ends the file ends the last line
                    found += 1
                    if found == lines:
                        return start + i + 1
            pos = start
    return 0


def _read_from(path: pathlib.Path, offset: int) -> bytes:
    if not path.exists():
        return b""
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(_CHUNK)


async def _stream_log(
    daemon: Daemon, job_id: str, path: pathlib.Path, offset: int, follow: bool
) -> AsyncIterator[bytes]:
    """The log from `offset`, a chunk at a time; with `follow`, until the job has ended."""
    while True:
        chunk = await asyncio.to_thread(_read_from, path, offset)
        if chunk:
            offset += len(chunk)
            yield chunk
            continue
        if not follow:
            return
        state = (await asyncio.to_thread(daemon.store.get, job_id)).state
        if state in TERMINAL:
            follow = False  # send what the log holds now, then end
            continue
        await asyncio.sleep(0.2)
