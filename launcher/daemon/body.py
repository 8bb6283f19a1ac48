"""Request bodies from anyone: JSON or YAML bytes in, plain JSON data out, at a bounded cost.

`parse_body` returns only what JSON can hold (mappings with string keys, lists,
strings, finite numbers, booleans, null) or raises `BodyError` (422) naming where
the problem is and what is allowed. Refused:

- bytes that are not UTF-8 (a UTF-8 byte-order mark is skipped);
- nesting deeper than `Limits.max_depth`, more than `Limits.max_nodes` values;
- YAML anchors and aliases (`&a`, `*a`: a 400-byte document expands to gigabytes),
  merge keys (`<<`), tags beyond the JSON types (`!!binary`, `!!set`, `!!python/...`),
  more than one document;
- duplicate keys, keys that are not strings (YAML's `1:`, `on:`, `null:`);
- NaN and infinities, integers beyond 64 bits, strings that cannot be UTF-8
  (lone surrogates from `\\ud800` escapes).

YAML timestamps stay strings. The structure (depth, count, aliases, tags) is
checked in a streaming pass that stops at the first bound crossed, before any
Python object is built: libyaml's event stream for YAML, a scan of strings and
brackets for JSON.

`BodyParser` runs `parse_body` in worker processes, at a lower CPU priority: a
second of YAML parsing in a thread of the daemon would hold the GIL the event loop
needs for every socket call (measured: /healthz p90 100 ms, max 0.7-2 s while
two 1 MB YAML bodies were parsed at a time; see tests/test_daemon_fuzz.py).
"""

from __future__ import annotations

import asyncio
import atexit
import codecs
import gc
import json
import math
import multiprocessing
import os
import re
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import yaml

from launcher.daemon.limits import Limits
from launcher.errors import BodyError

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when it is there
_CORE = "tag:yaml.org,2002:"
_TAGS = {None, "!"} | {_CORE + t for t in ("str", "int", "float", "bool", "null", "map", "seq")}
_INT64 = 1 << 63
# A JSON string (escapes included), a bracket, or any other run of scalar characters.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]|[^\s\[\]{}",:]+')


class BodyParser:
    """`parse_body` in `workers` processes of their own (spawned, niced, gone with the daemon).

    One pool per process and worker count, started at the first use; a pool whose
    worker died (killed, out of memory) is replaced and the request answers 503.
    """

    _pools: dict[int, ProcessPoolExecutor] = {}
    _lock = threading.Lock()

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def start(self) -> None:
        """Start the workers now (each imports the parser: about half a second)."""
        pool = self._pool()
        for _ in range(self.workers):
            pool.submit(int)

    async def parse(self, body: bytes, content_type: str, limits: Limits) -> Any:
        pool = self._pool()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                pool, parse_body, body, content_type, limits
            )
        except BrokenProcessPool:
            with self._lock:
                if self._pools.get(self.workers) is pool:
                    del self._pools[self.workers]
            raise BodyError("the body parser's process died; retry", status=503) from None

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            pool = self._pools.get(self.workers)
            if pool is None:
                pool = self._pools[self.workers] = ProcessPoolExecutor(
                    self.workers,
                    mp_context=multiprocessing.get_context("spawn"),  # never fork the daemon
                    initializer=_worker_start,
                    initargs=(os.getpid(),),
                )
            return pool

    @classmethod
    def close_all(cls) -> None:
        """Stop every pool's workers (at exit: multiprocessing then has nothing to warn of)."""
        with cls._lock:
            pools, cls._pools = list(cls._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        del pools
        gc.collect()  # the pools' queues release their semaphores now, not at exit


atexit.register(BodyParser.close_all)


def _worker_start(parent: int) -> None:
    """In a parser process: yield the CPU to the daemon, and end within a second of it
    (even of a SIGKILL: the daemon leaves no process behind)."""
    os.nice(10)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def parse_body(body: bytes, content_type: str, limits: Limits | None = None) -> Any:
    """The body as plain JSON data: YAML when the content type says yaml, else JSON."""
    limits = limits or Limits()
    if body.startswith(codecs.BOM_UTF8):
        body = body[len(codecs.BOM_UTF8) :]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(
            f"the body is not UTF-8: byte 0x{body[exc.start]:02x} at offset {exc.start}; "
            "send the spec as UTF-8"
        ) from None
    is_yaml = "yaml" in content_type.lower()
    data = _load_yaml(text, limits) if is_yaml else _load_json(text, limits)
    _check_values(data)
    return data


# -- JSON ------------------------------------------------------------------------------------


def _load_json(text: str, limits: Limits) -> Any:
    depth = nodes = 0
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > limits.max_depth:
                raise BodyError(_too_deep(limits, f"offset {match.start()}"))
        elif token in ("]", "}"):
            depth -= 1
            continue
        nodes += 1
        if nodes > limits.max_nodes:
            raise BodyError(_too_many(limits))
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:  # the scan above makes this unreachable; kept as a backstop
        raise BodyError(_too_deep(limits, "somewhere")) from None
    except ValueError as exc:
        if isinstance(exc, BodyError):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BodyError(
            "the body is not valid JSON (send YAML with Content-Type: application/yaml): " + first
        ) from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BodyError(f"duplicate key {key!r} in a JSON object: give each key once")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise BodyError(f"{name} is not a number JSON allows: give a finite number")


# -- YAML ------------------------------------------------------------------------------------


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """Safe YAML with string keys only, no duplicates, no merge keys, dates kept as text."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            where = _mark(key_node.start_mark)
            if key_node.tag == _CORE + "merge":
                raise BodyError(f"YAML merge keys (<<) are refused ({where}): write the keys out")
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                raise BodyError(
                    f"YAML key {key!r} ({where}) is not a string but {type(key).__name__}: quote it"
                )
            if key in out:
                raise BodyError(f"duplicate key {key!r} ({where}): give each key once")
            out[key] = self.construct_object(value_node, deep=deep)
        return out


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _CORE + "timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _load_yaml(text: str, limits: Limits) -> Any:
    try:
        _check_yaml_events(text, limits)
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader, checked above
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BodyError(f"the body is not valid YAML: {first} ({_error_mark(exc)})") from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer of more than 4300 digits
        if isinstance(exc, BodyError):
            raise
        raise BodyError(f"the body is not valid YAML: {exc}") from None


def _check_yaml_events(text: str, limits: Limits) -> None:
    """Stream the parser's events: refuse aliases, anchors, odd tags, depth and size over the
    limits, a second document; stop at the first one."""
    depth = nodes = documents = 0
    for event in yaml.parse(text, Loader=_Loader):
        where = _mark(event.start_mark)
        if isinstance(event, yaml.AliasEvent):
            raise BodyError(
                f"YAML aliases are refused: *{event.anchor} ({where}); write the value out"
            )
        if isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise BodyError(f"the body holds more than one YAML document ({where}): send one")
        if isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        if not isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)):
            continue
        if event.anchor is not None:
            raise BodyError(
                f"YAML anchors are refused: &{event.anchor} ({where}); write the value out"
            )
        if event.tag not in _TAGS:
            raise BodyError(
                f"YAML tag {event.tag} ({where}) is refused: only strings, numbers, booleans, "
                "null, mappings and lists"
            )
        nodes += 1
        if nodes > limits.max_nodes:
            raise BodyError(_too_many(limits))
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > limits.max_depth:
                raise BodyError(_too_deep(limits, where))


def _mark(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"


def _error_mark(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return _mark(mark)


# -- values ----------------------------------------------------------------------------------


def _check_values(data: Any) -> None:
    """Numbers finite and within 64 bits, strings encodable: what every JSON reader takes."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ("body",))]
    while stack:
        value, loc = stack.pop()
        if isinstance(value, dict):
            stack.extend((v, (*loc, k)) for k, v in value.items())
            for key in value:
                _check_text(key, (*loc, key))
        elif isinstance(value, list):
            stack.extend((v, (*loc, str(i))) for i, v in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, loc)
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int):
            if not -_INT64 <= value < _INT64:
                raise BodyError(
                    f"{'.'.join(loc)}: the integer has {len(str(abs(value)))} digits; at most "
                    f"64 bits ({-_INT64} .. {_INT64 - 1})",
                    loc,
                )
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise BodyError(
                    f"{'.'.join(loc)}: {value} is not allowed: give a finite number", loc
                )
        else:  # the loaders above build nothing else; a backstop for new YAML types
            raise BodyError(f"{'.'.join(loc)}: a {type(value).__name__} is not JSON data", loc)


def _check_text(text: str, loc: tuple[str, ...]) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BodyError(
            f"{'.'.join(loc)}: character {ascii(text[exc.start])} at {exc.start} is a lone "
            "UTF-16 surrogate, not text",
            loc,
        ) from None


def _too_deep(limits: Limits, where: str) -> str:
    return f"the body nests deeper than {limits.max_depth} levels ({where}): flatten it"


def _too_many(limits: Limits) -> str:
    return f"the body holds more than {limits.max_nodes} values: a job spec needs far fewer"
