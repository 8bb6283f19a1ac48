"""The daemon's HTTP JSON API (FastAPI): jobs, logs, health, metrics; OpenAPI at /openapi.json.

    POST /v1/jobs                 a job spec (JSON, or YAML with a yaml content type) -> id
    GET  /v1/jobs                 every job, in queue order (?state=running)
    GET  /v1/jobs/{id}            state, plan, progress, restarts, last error, transitions
    POST /v1/jobs/{id}/cancel     stop the job's actors, free its devices
    GET  /v1/jobs/{id}/logs       the job log (?tail=N, 0: all; ?follow=true streams until it ends)
    GET  /healthz                 liveness (never needs the token)
    GET  /metrics                 Prometheus exposition: job states and every running rank

Two ASGI layers wrap the app: a bearer-token check (constant time; every route
but /healthz) and a request body cap (413 over `max_body` bytes). Invalid specs
answer 422 with the field path of each problem; unknown ids 404.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import yaml
from fastapi import FastAPI, Query, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from pydantic import BaseModel

from launcher.daemon.daemon import Daemon, InvalidSpec, JobStateError
from launcher.daemon.store import STATES, TERMINAL, UnknownJob
from launcher.job.spec import JobSpec

MAX_BODY = 1 << 20
State = Literal["queued", "probing", "running", "restarting", "succeeded", "failed", "cancelled"]
assert tuple(State.__args__) == STATES  # the Literal and the store agree


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


def create_app(daemon: Daemon, *, token: str | None = None, max_body: int = MAX_BODY) -> Any:
    """The ASGI application: FastAPI routes inside the auth and body-cap layers."""
    app = FastAPI(title="autobatch daemon", version="1", docs_url=None, redoc_url=None)

    @app.exception_handler(UnknownJob)
    async def _unknown(request: Request, exc: UnknownJob) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(InvalidSpec)
    async def _invalid(request: Request, exc: InvalidSpec) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "errors": exc.errors}, status_code=422)

    @app.exception_handler(JobStateError)
    async def _conflict(request: Request, exc: JobStateError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.post("/v1/jobs", status_code=201, openapi_extra=_spec_body())
    async def submit(request: Request) -> dict[str, str]:
        data = _parse_body(await request.body(), request.headers.get("content-type", ""))
        job_id = await asyncio.to_thread(daemon.submit, data)
        return {"id": job_id, "state": "queued"}

    @app.get("/v1/jobs", response_model=list[JobBrief])
    async def jobs(state: State | None = None) -> Response:
        # Serialised here, not by FastAPI: a listing is the hot path (see bench_daemon.py).
        briefs = await asyncio.to_thread(daemon.store.briefs, state)
        return Response(json.dumps(briefs).encode(), media_type="application/json")

    @app.get("/v1/jobs/{job_id}")
    async def job(job_id: str) -> dict[str, Any]:
        rec = await asyncio.to_thread(daemon.store.get, job_id)
        out = rec.to_dict()
        out["transitions"] = [t.__dict__ for t in daemon.store.transitions(job_id)]
        return out

    @app.post("/v1/jobs/{job_id}/cancel")
    async def cancel(job_id: str) -> dict[str, str]:
        state = await asyncio.to_thread(daemon.cancel, job_id)
        return {"id": job_id, "state": state}

    @app.get("/v1/jobs/{job_id}/logs", response_class=PlainTextResponse)
    async def logs(
        job_id: str, tail: int = Query(200, ge=0, le=100_000), follow: bool = False
    ) -> Response:
        path = daemon.log_path(job_id)
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        lines = text.splitlines(keepends=True)
        head = "".join(lines[-tail:] if tail else lines)  # tail=0: the whole log
        if not follow:
            return PlainTextResponse(head)
        return StreamingResponse(
            _follow(daemon, job_id, head, len(text.encode())), media_type="text/plain"
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "running": len(daemon.running)}

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
    return BodyCap(BearerAuth(app, token), max_body)


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


def _parse_body(body: bytes, content_type: str) -> Any:
    is_yaml = "yaml" in content_type
    try:
        text = body.decode("utf-8")
        return yaml.safe_load(text) if is_yaml else json.loads(text)
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        kind = "YAML" if is_yaml else "JSON (send YAML with Content-Type: application/yaml)"
        msg = f"the body is not valid {kind}: {str(exc).splitlines()[0] if str(exc) else exc}"
        raise InvalidSpec(msg, [{"loc": ["body"], "msg": msg}]) from None


async def _follow(daemon: Daemon, job_id: str, head: str, offset: int) -> AsyncIterator[bytes]:
    yield head.encode()
    path = daemon.log_path(job_id)
    while True:
        state = daemon.store.get(job_id).state
        size = path.stat().st_size if path.exists() else 0
        if size > offset:
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read(size - offset)
            offset = size
            yield chunk
        elif state in TERMINAL:
            return
        await asyncio.sleep(0.2)


class BearerAuth:
    """Every path but /healthz needs `Authorization: Bearer <token>` when a token is set."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.app, self.token = app, (token or "").encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.token and scope["path"] != "/healthz":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
                response = JSONResponse(
                    {"detail": "missing or wrong token: send Authorization: Bearer <token>"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyCap:
    """Reads the whole body first (at most `max_body` bytes), answers 413 beyond it."""

    def __init__(self, app: Any, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.max_body
        chunks, size, more = [], 0, not too_big
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                too_big = True
                break
        if too_big:
            response = JSONResponse(
                {"detail": f"request body over {self.max_body} bytes"}, status_code=413
            )
            await response(scope, receive, send)
            return
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
