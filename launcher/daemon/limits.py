"""What one request may cost the daemon: every bound the API enforces, in one value.

    transport   max_connections, header_timeout_s    (launcher.daemon.guards: the protocol)
    body        max_body, max_drain, body_timeout_s, max_buffered (guards: BodyCap)
    parsing     max_depth, max_nodes, parse_workers   (launcher.daemon.body)
    storage     max_spec_bytes                        (launcher.daemon.api: POST /v1/jobs)
    listing     default_page, max_page                (launcher.daemon.api: GET /v1/jobs)

The memory a burst of hostile requests can hold is about `max_buffered` (bodies
read or waiting to be parsed) + `parse_workers` x the parse of one body (at most
`max_nodes` values) + a few KiB per open connection (`max_connections`);
tests/test_daemon_fuzz.py measures it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Limits:
    # at most this many open connections: beyond it a new one is closed at once
    max_connections: int = 1000
    # a connection has this long to send a request's headers (slow-header clients)
    header_timeout_s: float = 10.0
    # a request body over this many bytes answers 413 (with or without Content-Length)
    max_body: int = 1 << 20
    # a body over max_body is read and dropped up to this many bytes before the 413, so a
    # client that sends its whole body before reading (Python's urllib) gets the answer,
    # not a connection reset; beyond it the connection is closed unread
    max_drain: int = 16 << 20
    # the whole body must arrive within this long of the first read: else 408 (slow clients)
    body_timeout_s: float = 10.0
    # bytes of request bodies held at once (read so far, or waiting to be parsed); a body
    # that would go beyond answers 503 (slow clients hold what they sent: next to nothing)
    max_buffered: int = 32 << 20
    # a body nests at most this deep (mappings and lists)
    max_depth: int = 32
    # a body holds at most this many values (scalars, mappings and lists)
    max_nodes: int = 20_000
    # threads that parse and validate bodies (off the event loop)
    parse_workers: int = 2
    # a job spec as the daemon stores it (JSON) is at most this many bytes: else 413
    max_spec_bytes: int = 256 << 10
    # GET /v1/jobs: rows per page by default, and at most
    default_page: int = 100
    max_page: int = 1000

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ValueError(f"Limits.{f.name}={value!r} must be > 0")
        if self.default_page > self.max_page:
            raise ValueError(
                f"Limits.default_page={self.default_page} must be <= max_page={self.max_page}"
            )
