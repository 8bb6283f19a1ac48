"""What stands between the network and the API's routes, each bounded by `Limits`.

    connection   GuardedH11Protocol: at most `max_connections` open; a connection that
                 has not sent a whole request head within `header_timeout_s` is closed
    token        BearerAuth: `Authorization: Bearer <token>` on every path but /healthz
    body         BodyCap: each body at most `max_body` bytes (else 413, with or without
                 Content-Length), read in full within `body_timeout_s` (else 408), and
                 all bodies held at once at most `max_buffered` bytes (else 503)

`uvicorn_config` builds the server's configuration with these, for `autobatch
serve` and the tests alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
from typing import Any

import uvicorn
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from launcher.daemon.limits import Limits


def uvicorn_config(app: Any, limits: Limits, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's configuration for the daemon's app: the guarded HTTP/1.1 protocol."""
    protocol = type("Guarded", (GuardedH11Protocol,), {"limits": limits})
    return uvicorn.Config(app, http=protocol, lifespan="off", log_level="warning", **kwargs)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a deadline for each request head.

    uvicorn closes an idle kept-alive connection but waits forever for a request that
    arrives a byte at a time; this closes it after `header_timeout_s`.
    """

    limits = Limits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            transport.abort()  # connection_lost() forgets it
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio sets this only on sockets made with proto=IPPROTO_TCP, and a listening
            # socket made by hand has proto 0: uvicorn's two writes per response (head, body)
            # then met the client's delayed ACK, 40 ms a request on a kept-alive connection.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request's head has as long as the first one's

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a request head arrived: its body has its own deadline (BodyCap)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_late)

    def _disarm(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:  # no request in progress
            self.transport.close()


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
    """Reads a request's whole body first, within the limits, then hands it to the app.

    A body's bytes count against `max_buffered` from the first read until the request
    is answered (parsing included), so the bodies in memory, and the parsing they
    cause, are bounded; a slow client holds only what it has sent. Refusals close the
    connection: a client still sending is not read any further.
    """

    def __init__(self, app: Any, limits: Limits) -> None:
        self.app, self.limits = app, limits
        self.buffered = 0  # bytes of bodies held now (one event loop: no lock)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared in (None, b"0") and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body
            return
        limits = self.limits
        if declared is not None and int(declared) > limits.max_body:  # h11 checked the digits
            await _drain(receive, limits, int(declared))
            await _refuse(scope, receive, send, 413, _too_big(limits))
            return
        held = [0]  # what this request holds of `buffered`
        try:
            try:
                body = await asyncio.wait_for(self._read(receive, held), limits.body_timeout_s)
            except _Refused as exc:
                if exc.args[0] == 413:
                    await _drain(receive, limits)
                await _refuse(scope, receive, send, *exc.args)
                return
            except asyncio.TimeoutError:
                await _refuse(
                    scope, receive, send, 408,
                    f"the request body did not arrive within {limits.body_timeout_s:g} s",
                )  # fmt: skip
                return
            if body is None:  # the client went away
                return
            sent = False

            async def replay() -> dict:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        finally:
            self.buffered -= held[0]

    async def _read(self, receive: Any, held: list[int]) -> bytes | None:
        """The body, counting what has arrived (not what was declared) against the budget."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limits.max_body:
                raise _Refused(413, _too_big(self.limits))
            self._hold(held, size - held[0])
            more = message.get("more_body", False)
        return b"".join(chunks)

    def _hold(self, held: list[int], more: int) -> None:
        if more <= 0:
            return
        if self.buffered + more > self.limits.max_buffered:
            raise _Refused(
                503,
                f"the daemon holds {self.limits.max_buffered} bytes of request bodies "
                "already (max_buffered); retry",
                1,
            )
        self.buffered += more
        held[0] += more


class _Refused(Exception):
    """(status, detail[, retry_after]) to answer instead of reading on."""


async def _drain(receive: Any, limits: Limits, declared: int | None = None) -> None:
    """Read and drop the rest of a refused body, at most `max_drain` bytes and
    `body_timeout_s`: the server may only close a connection it read to the end without
    resetting it, and a client that sends its whole body first (Python's urllib) would
    then see the reset, not the answer. A body declared beyond the bound is not read."""
    if declared is not None and declared > limits.max_drain:
        return

    async def drain() -> None:
        left, more = limits.max_drain, True
        while more and left > 0:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            left -= len(message.get("body", b""))
            more = message.get("more_body", False)

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(drain(), limits.body_timeout_s)


def _too_big(limits: Limits) -> str:
    return f"request body over {limits.max_body} bytes (the limit)"


async def _refuse(
    scope: dict, receive: Any, send: Any, status: int, detail: str, retry_after: int | None = None
) -> None:
    headers = {"Connection": "close"}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(
        scope, receive, send
    )
