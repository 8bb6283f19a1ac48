"""No request can hurt the daemon: fuzzed, hostile and slow requests against real servers.

- schemathesis from the OpenAPI schema, schema-shaped and schema-breaking cases: no 5xx;
- generated valid specs, sent as JSON or YAML: every one is accepted (201) and stored as sent;
- a table of hostile bodies: each one answered 4xx at once, nothing stored;
- an attack from another process (aliases, depth, size, encodings, slow clients, idle
  connections) on `autobatch serve --api-only`: /healthz answers within 1 s throughout
  and the daemon's memory stays within ATTACK_RSS_BOUND of what it was before.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest
import yaml

schemathesis = pytest.importorskip("schemathesis")
from daemon_util import DaemonProcess, api_in_thread, tiny_spec  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from launcher.daemon.daemon import Daemon  # noqa: E402
from launcher.job.bounds import MAX_STEPS  # noqa: E402
from launcher.job.spec import JobSpec  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
ENTRY = "fuzzpkg.tasks:build"  # an entrypoint task the fuzzed daemon allows (never run)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    daemon = Daemon(tmp_path_factory.mktemp("fuzz"), run_jobs=False, task_modules=("fuzzpkg",))
    daemon.start()
    with api_in_thread(daemon) as url:
        yield url
    daemon.shutdown()


OPERATIONS = [
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/{job_id}"),
    ("POST", "/v1/jobs/{job_id}/cancel"),
    ("GET", "/v1/jobs/{job_id}/logs"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
]


def test_the_schema_lists_exactly_these_operations(server):
    loaded = schemathesis.openapi.from_url(f"{server}/openapi.json")
    found = {(op.method.upper(), op.path) for op in _operations(loaded)}
    assert found == set(OPERATIONS)


def _operations(loaded):
    return [r.ok() for r in loaded.get_all_operations()]


# Schema-breaking cases where the schema constrains something (a body, a query): the others
# take any string.
CASES = [(*op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    ("POST", "/v1/jobs", GenerationMode.NEGATIVE),
    ("GET", "/v1/jobs", GenerationMode.NEGATIVE),
    ("GET", "/v1/jobs/{job_id}/logs", GenerationMode.NEGATIVE),
]


@pytest.mark.parametrize("method, path, mode", CASES)
def test_no_request_gets_a_server_error(server, method, path, mode):
    loaded = schemathesis.openapi.from_url(f"{server}/openapi.json")
    op = loaded[path][method]

    @settings(
        max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def check(case):
        if isinstance(case.query, dict) and "follow" in case.query:
            case.query["follow"] = "false"  # a queued job's log stream never ends
        case.call_and_validate(base_url=server, checks=[not_a_server_error], timeout=30)

    check()


# -- valid specs: every one accepted, stored as sent -------------------------------------------

_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 63) - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=25,
)
_device = st.fixed_dictionaries(
    {
        "name": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
        "memory": st.sampled_from(["512MiB", "16MiB", "2GB", "1GiB"]),
    },
    optional={"speed": st.floats(0.01, 1000), "count": st.integers(1, 64)},
)


@st.composite
def valid_specs(draw) -> dict:
    """Specs the schema allows, with any JSON data in task_args (an allowed entrypoint)."""
    spec = {
        "name": draw(st.from_regex(r"[a-z0-9][a-z0-9_-]{0,62}", fullmatch=True)),
        "task": ENTRY,
        "global_batch_size": draw(st.integers(1, 1 << 24)),
        "task_args": draw(st.dictionaries(_text, _json, max_size=5)),
    }
    if draw(st.booleans()):
        spec["max_steps"] = draw(st.integers(1, MAX_STEPS))  # the schema's bound
    else:
        spec["epochs"] = draw(st.floats(1e-6, 1e6))
    optional = {
        "optimizer": st.fixed_dictionaries(
            {},
            optional={
                "name": st.sampled_from(["adamw", "sgd"]),
                "lr": st.floats(1e-9, 10),
                "betas": st.tuples(st.floats(0, 1), st.floats(0, 1)).map(list),
                "max_grad_norm": st.none() | st.floats(1e-3, 100),
            },
        ),
        "precision": st.sampled_from(["auto", "fp32", "bf16", "fp16"]),
        "devices": st.lists(_device, min_size=1, max_size=4).map(
            lambda sims: {"select": "simulated", "simulated": sims}
        ),
        "checkpoint": st.fixed_dictionaries(
            {"dir": st.from_regex(r"[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,2}", fullmatch=True)},
            optional={"interval": st.integers(1, 10**6), "resume": st.booleans()},
        ),
        "seed": st.integers(-(1 << 63), (1 << 63) - 1),
        "max_restarts": st.integers(0, 100),
        "faults": st.lists(
            st.fixed_dictionaries(
                {
                    "kind": st.sampled_from(["oom", "crash"]),
                    "rank": st.integers(0, 64),
                    "step": st.integers(0, 10**6),
                }
            ),
            max_size=3,
        ),
        "audit_samples": st.booleans(),
    }
    for key in draw(st.sets(st.sampled_from(sorted(optional)))):
        spec[key] = draw(optional[key])
    return spec


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=valid_specs(), as_yaml=st.booleans())
def test_every_valid_spec_is_accepted_and_stored_as_sent(server, spec, as_yaml):
    if as_yaml:  # non-ASCII escaped: PyYAML's emitter writes a raw U+0085 its reader folds
        body, ctype = yaml.safe_dump(spec).encode(), "application/yaml"
    else:  # raw UTF-8
        body, ctype = json.dumps(spec, ensure_ascii=False).encode(), "application/json"
    r = httpx.post(f"{server}/v1/jobs", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 201, r.text
    stored = httpx.get(f"{server}/v1/jobs/{r.json()['id']}").json()["spec"]
    expected = JobSpec.model_validate(spec).model_dump(mode="json")
    for where in (stored, expected):  # the daemon resolves these under its checkpoint root
        where["checkpoint"].pop("dir"), where.pop("output_dir")
    assert stored == expected
    assert stored["task_args"] == spec["task_args"]


# -- hostile bodies ----------------------------------------------------------------------------

YAML, JSON = "application/yaml", "application/json"
HEAD = "name: x\nglobal_batch_size: 1\nmax_steps: 1\n"


def _laughs(levels: int = 8) -> str:
    """The issue's 463-byte YAML: 9 aliases per level expand to 9^levels strings."""
    lines = ["task_args:", "  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    names = "abcdefghijklmnop"
    for prev, name in zip(names, names[1 : levels + 1]):
        lines.append(f"  {name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return HEAD + "\n".join(lines) + "\n"


def _spec_json(**over) -> bytes:
    return json.dumps(tiny_spec(**over)).encode()


def _nested(depth: int) -> list:
    out: list = []
    for _ in range(depth - 1):
        out = [out]
    return out


HOSTILE = [
    # (body, content type, status, what the answer says)
    pytest.param(
        _laughs().encode(), YAML, 422, "YAML anchors are refused: &a",
        id="billion-laughs",  # aliases expand 440 bytes to 43 million strings
    ),
    pytest.param(
        (HEAD + "task_args: {a: *undefined}\n").encode(), YAML, 422, "YAML aliases are refused",
        id="alias-without-anchor",  # refused before the composer looks it up
    ),
    pytest.param(
        b"[" * 100_000, YAML, 422, "not valid YAML",
        id="yaml-flow-100k-deep",  # libyaml stops at its own nesting limit; no recursion here
    ),
    pytest.param(
        ("a:\n" + "".join("  " * i + "- \n" for i in range(1, 40))).encode(), YAML, 422,
        "nests deeper than 32 levels",
        id="yaml-block-40-deep",  # the event stream stops at level 33
    ),
    pytest.param(
        b"[" * 100_000 + b"]" * 100_000, JSON, 422, "nests deeper than 32 levels",
        id="json-100k-deep",  # json.loads would raise RecursionError (a 500 before)
    ),
    pytest.param(
        _spec_json(task_args={"x": _nested(255)}), JSON, 422, "nests deeper than 32 levels",
        id="task-args-255-deep",  # the 600-byte spec: pydantic's serializer gave 500
    ),
    pytest.param(
        json.dumps({**tiny_spec(task="fuzzpkg.t:f"), "task_args": {"x": _nested(20)}}).encode(),
        JSON, 422, "task_args: nested deeper than 16 levels",
        id="task-args-20-deep",  # within the body's bound, over task_args' own
    ),
    pytest.param(
        _spec_json(checkpoint={"dir": "a\x00b"}), JSON, 422,
        "checkpoint.dir: a NUL byte (\\x00) in text",
        id="nul-in-checkpoint-dir",  # pathlib raised ValueError: embedded null byte (a 500)
    ),
    pytest.param(
        (HEAD + 'output_dir: "out\\0put"\n').encode(), YAML, 422, "output_dir: a NUL byte",
        id="nul-escape-in-yaml",  # YAML's \0 escape
    ),
    pytest.param(
        json.dumps({**tiny_spec(task="fuzzpkg.t:f"), "task_args": {"k\x00": 1}}).encode(), JSON,
        422, "without NUL bytes",
        id="nul-in-a-task-args-key",
    ),
    pytest.param(
        HEAD.encode() + b"seed: \x00\n", YAML, 422, "not valid YAML",
        id="raw-nul-byte-in-yaml",  # libyaml: control characters are not allowed
    ),
    pytest.param(
        b'{"name": "a\x00"}', JSON, 422, "not valid JSON",
        id="raw-nul-byte-in-json",  # JSON forbids raw control characters in strings
    ),
    pytest.param(
        b'{"name": "\xff\xfe"}', JSON, 422, "not UTF-8: byte 0xff at offset 10",
        id="invalid-utf8",
    ),
    pytest.param(
        json.dumps(tiny_spec()).encode("utf-16"), JSON, 422, "not UTF-8",
        id="utf16-with-bom",  # json.loads(bytes) would guess UTF-16; the API takes UTF-8 only
    ),
    pytest.param(
        "name: café\n".encode("latin-1"), YAML, 422, "not UTF-8: byte 0xe9",
        id="latin1",
    ),
    pytest.param(
        b'{"name": "\\ud800"}', JSON, 422, "lone UTF-16 surrogate",
        id="lone-surrogate-escape",  # json.loads makes it; no UTF-8 encoder takes it (a 500)
    ),
    pytest.param(
        (HEAD + 'output_dir: "\\ud800"\n').encode(), YAML, 422, "not valid YAML",
        id="lone-surrogate-escape-yaml",  # libyaml refuses it outright
    ),
    pytest.param(
        _spec_json(optimizer={"betas": [float("nan"), 0.9]}), JSON, 422, "NaN is not a number",
        id="nan",  # stored, then every GET of the job answered 500
    ),
    pytest.param(
        _spec_json().replace(b'"seed": 1', b'"seed": 1e999'), JSON, 422, "inf is not allowed",
        id="float-overflow",
    ),
    pytest.param(
        (HEAD + "seed: .inf\n").encode(), YAML, 422, "inf is not allowed", id="yaml-infinity"
    ),
    pytest.param(
        _spec_json().replace(b'"seed": 1', b'"seed": 1' + b"0" * 4000), JSON, 422,
        "body.seed: the integer has 4001 digits; at most 64 bits",
        id="int-4000-digits",
    ),
    pytest.param(
        _spec_json().replace(b'"seed": 1', b'"seed": 1' + b"0" * 5000), JSON, 422,
        "Exceeds the limit (4300 digits)",
        id="int-5000-digits",  # Python's own guard against quadratic int parsing
    ),
    pytest.param(
        (HEAD + "seed: 1" + "0" * 5000 + "\n").encode(), YAML, 422, "4300 digits",
        id="yaml-int-5000-digits",  # a ValueError, not a YAMLError (a 500 before)
    ),
    pytest.param(
        b'{"name": "a", "name": "b"}', JSON, 422, "duplicate key 'name'",
        id="duplicate-key-json",  # json.loads keeps the last one silently
    ),
    pytest.param(
        b"name: a\nname: b\n", YAML, 422, "duplicate key 'name' (line 2, column 1)",
        id="duplicate-key-yaml",
    ),
    pytest.param(b"[1, 2]", JSON, 422, "a job spec is a mapping", id="top-level-list"),
    pytest.param(b'"spec"', JSON, 422, "a job spec is a mapping", id="top-level-string"),
    pytest.param(b"", YAML, 422, "a job spec is a mapping", id="empty-yaml"),  # null
    pytest.param(b"", JSON, 422, "not valid JSON", id="empty-json"),
    pytest.param(b"a: 1\n---\nb: 2\n", YAML, 422, "more than one YAML document", id="two-docs"),
    pytest.param(
        b"!!python/object/apply:os.system ['id']", YAML, 422, "tag:yaml.org,2002:python",
        id="python-tag",  # safe_load refused it too, but as a YAMLError
    ),
    pytest.param(
        (HEAD + "task_args: {b: !!binary /w==}\n").encode(), YAML, 422, "tag:yaml.org,2002:binary",
        id="binary-tag",  # bytes that are not UTF-8 failed JSON serialisation (a 500)
    ),
    pytest.param(
        (HEAD + "task_args: !!set {a: null}\n").encode(), YAML, 422, "tag:yaml.org,2002:set",
        id="set-tag",
    ),
    pytest.param(
        (HEAD + "<<: {seed: 2}\n").encode(), YAML, 422, "merge keys (<<) are refused",
        id="merge-key",
    ),
    pytest.param(
        (HEAD + "on: 1\n").encode(), YAML, 422, "True (line 4, column 1) is not a string but bool",
        id="yaml-1.1-bool-key",  # `on:` is True in YAML 1.1
    ),
    pytest.param(
        (HEAD + "1: x\n").encode(), YAML, 422, "YAML key 1", id="int-key",
    ),
    pytest.param(
        b"[" + b"1," * 25_000 + b"1]", JSON, 422, "more than 20000 values",
        id="too-many-values",  # 50 KB of JSON, counted before json.loads builds anything
    ),
    pytest.param(
        json.dumps({**tiny_spec(task="fuzzpkg.t:f"), "task_args": {"x": "y" * 70_000}}).encode(),
        JSON, 422, "task_args: over 65536 bytes as JSON",
        id="task-args-over-64k",
    ),
    pytest.param(
        b"x" * ((1 << 20) + 1), JSON, 413, "request body over 1048576 bytes",
        id="over-1mib",
    ),
]  # fmt: skip


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    daemon = Daemon(tmp_path_factory.mktemp("hostile"), run_jobs=False, task_modules=("fuzzpkg",))
    daemon.start()
    with api_in_thread(daemon) as url:
        yield url, daemon
    daemon.shutdown()


@pytest.mark.parametrize("body, ctype, status, message", HOSTILE)
def test_a_hostile_body_is_refused_at_once_and_nothing_is_stored(
    hostile_server, body, ctype, status, message
):
    url, daemon = hostile_server
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/jobs", content=body, headers={"Content-Type": ctype}, timeout=30)
    took = time.monotonic() - t0
    assert r.status_code == status, r.text[:500]
    assert message in r.json()["detail"], r.json()["detail"][:500]
    assert took < 1.0, f"answered in {took:.2f} s"
    assert sum(daemon.store.counts().values()) == 0


def test_an_oversized_body_without_content_length_answers_413(hostile_server):
    url, _ = hostile_server

    def chunks():  # chunked: the cap counts what arrives
        for _ in range(40):
            yield b"x" * 65536

    r = httpx.post(f"{url}/v1/jobs", content=chunks(), headers={"Content-Type": JSON})
    assert r.status_code == 413 and "over 1048576 bytes" in r.json()["detail"]


# -- an attack from another process -----------------------------------------------------------

ATTACK_S = 12.0  # longer than the header and body deadlines (10 s): they must fire
# The daemon's RSS (with its body parsers) may grow this much over its idle size: 32 MiB of
# bodies held (Limits.max_buffered), two parses, a thousand connections, allocator slack.
ATTACK_RSS_BOUND = 150 << 20


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _status(sock: socket.socket) -> str:
    try:
        return sock.recv(64).split(b" ")[1].decode() or "closed"
    except (OSError, IndexError):
        return "reset"


def _post(url: str, body: bytes, ctype: str, *, chunked: bool = False) -> str:
    """One request on its own connection: its status, or how the connection ended."""
    with _raw(url) as sock:
        length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
        head = f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n{length}\r\n\r\n"
        try:
            sock.sendall(head.encode())
            if chunked:
                for i in range(0, len(body), 65536):
                    part = body[i : i + 65536]
                    sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
                sock.sendall(b"0\r\n\r\n")
            else:
                sock.sendall(body)
        except OSError:
            pass  # refused mid-body (413): read the answer
        return _status(sock)


def attack(url: str, seconds: float, report: str) -> None:
    """Hostile clients for `seconds`, from this process; what they saw goes to `report`."""
    end = time.monotonic() + seconds
    seen: Counter = Counter()
    lock = threading.Lock()

    def count(kind: str, status: str) -> None:
        with lock:
            seen[f"{kind} {status}"] += 1

    heavy = (HEAD + "task: fuzzpkg.t:f\ntask_args:\n").encode() + b"".join(
        b"  k%05d: %s\n" % (i, b"v" * 90) for i in range(9990)
    )  # 1 MB, 20,000 values: the most a body may cost to parse; then 422 (over 64 KiB)
    bodies = [(p.values[0], p.values[1]) for p in HOSTILE]

    def hostile() -> None:  # the table, over and over
        i = 0
        while time.monotonic() < end:
            body, ctype = bodies[i % len(bodies)]
            count("hostile", _post(url, body, ctype))
            i += 1

    def large() -> None:  # the costliest bodies within the limits, and bodies over them
        i = 0
        while time.monotonic() < end:
            kind = ("heavy-yaml", "2mib-length", "2mib-chunked")[i % 3]
            if kind == "heavy-yaml":
                status = _post(url, heavy, YAML)
            else:
                status = _post(url, b"x" * (2 << 20), JSON, chunked=kind == "2mib-chunked")
            count(kind, status)
            i += 1

    def slow(kind: str) -> None:  # a byte a second: the deadlines must end them
        with _raw(url) as sock:
            if kind == "slow-body":
                sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            else:
                sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n")
            sock.settimeout(1.0)
            while time.monotonic() < end + 5:
                try:
                    if sock.recv(64, socket.MSG_PEEK):
                        count(kind, _status(sock))
                        return
                    count(kind, "closed")
                    return
                except TimeoutError:
                    pass
                except OSError:
                    count(kind, "reset")
                    return
                try:
                    sock.sendall(b"x" if kind == "slow-body" else b"X-Slow: 1\r\n")
                except OSError:
                    count(kind, "reset")
                    return
            count(kind, "still open")

    def idle() -> None:  # connections that never send a byte
        with _raw(url) as sock:
            sock.settimeout(end + 5 - time.monotonic())
            try:
                count("idle", "closed" if sock.recv(1) == b"" else "answered")
            except TimeoutError:
                count("idle", "still open")
            except OSError:
                count("idle", "reset")

    threads = [threading.Thread(target=hostile) for _ in range(3)]
    threads += [threading.Thread(target=large) for _ in range(2)]
    threads += [threading.Thread(target=slow, args=("slow-body",)) for _ in range(60)]
    threads += [threading.Thread(target=slow, args=("slow-head",)) for _ in range(60)]
    threads += [threading.Thread(target=idle) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pathlib.Path(report).write_text(json.dumps(dict(seen)))


def _rss(pid: int) -> int:
    """Resident bytes of the process and its children (the body parsers)."""
    total = 0
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if stat.parent.name == str(pid) or ppid == pid:
                status = (stat.parent / "status").read_text()
                total += int(status.split("VmRSS:")[1].split()[0]) << 10
        except (OSError, IndexError, ValueError):
            continue
    return total


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="reads /proc")
def test_healthz_answers_within_1s_and_memory_stays_bounded_under_attack(tmp_path):
    daemon = DaemonProcess(tmp_path / "state", tmp_path / "cache", "--api-only")
    try:
        pid = daemon.proc.pid
        for _ in range(20):  # warm up: the routes' first calls import and cache things
            daemon.http.get("/healthz"), daemon.http.get("/v1/jobs")
        daemon.http.post("/v1/jobs", content=b"[", headers={"Content-Type": YAML})
        idle_rss = _rss(pid)
        report = tmp_path / "attack.json"
        attacker = subprocess.Popen(
            [sys.executable, "-c",
             f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_daemon_fuzz as t; "
             f"t.attack({daemon.url!r}, {ATTACK_S}, {str(report)!r})"],
            env={**os.environ, "PYTHONPATH": str(HERE.parent)},
        )  # fmt: skip
        latencies, peak_rss, accepted = [], idle_rss, []
        with httpx.Client(base_url=daemon.url, timeout=10) as probe:
            while attacker.poll() is None:
                t0 = time.monotonic()
                with _raw(daemon.url) as sock:  # a new connection each time, as a prober does
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert _status(sock) == "200"
                latencies.append(time.monotonic() - t0)
                peak_rss = max(peak_rss, _rss(pid))
                if len(latencies) % 20 == 0:  # a real user submits meanwhile
                    t0 = time.monotonic()
                    r = probe.post("/v1/jobs", json=tiny_spec("legit"))
                    accepted.append((r.status_code, time.monotonic() - t0))
                time.sleep(0.05)
        assert attacker.wait() == 0
        seen = json.loads(report.read_text())
        print(f"\nattack: {seen}")
        print(
            f"/healthz: {len(latencies)} probes, max {max(latencies) * 1000:.0f} ms, "
            f"p99 {sorted(latencies)[int(len(latencies) * 0.99)] * 1000:.0f} ms; RSS idle "
            f"{idle_rss >> 20} MiB, peak {peak_rss >> 20} MiB (+{(peak_rss - idle_rss) >> 20}); "
            f"submits meanwhile: {[(c, round(t, 2)) for c, t in accepted]}"
        )
        assert max(latencies) < 1.0
        assert peak_rss - idle_rss < ATTACK_RSS_BOUND
        # the deadlines ended every slow client (a client writing its next byte as the server
        # closes sees a reset rather than the answer)
        ended = {k: seen.get(f"{k} 408", 0) + seen.get(f"{k} closed", 0) + seen.get(f"{k} reset", 0)
                 for k in ("slow-body", "slow-head", "idle")}  # fmt: skip
        assert ended == {"slow-body": 60, "slow-head": 60, "idle": 200}, seen
        assert seen.get("slow-body 408", 0) >= 1, seen
        assert seen.get("heavy-yaml 422", 0) >= 1 and seen.get("2mib-length 413", 0) >= 1, seen
        assert not any(k.endswith(" 500") for k in seen), seen
        assert accepted and {c for c, _ in accepted} <= {201, 503}, accepted
        # nothing hostile was stored; the daemon still takes a spec at once
        names = {j["name"] for j in daemon.http.get("/v1/jobs").json()["jobs"]}
        assert names <= {"legit"}
        assert daemon.http.post("/v1/jobs", json=tiny_spec("after")).status_code == 201
    finally:
        daemon.stop()
