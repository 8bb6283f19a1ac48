"""The daemon's HTTP API on a real loopback server, with a real SQLite store, without Ray.

The daemon here does not run jobs (`run_jobs=False`): submitted jobs stay queued,
which is all the API's contract needs. Running jobs: tests/test_daemon_e2e.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import yaml
from daemon_util import ROOT, DaemonProcess, api_in_thread, tiny_spec

from launcher.cli import main
from launcher.daemon.client import DaemonClient
from launcher.daemon.daemon import Daemon
from launcher.daemon.limits import Limits
from launcher.daemon.serve import check_bind
from launcher.errors import ClientError, ServeError

TOKEN = "s3cret-token"


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "state", run_jobs=False)
    d.start()
    yield d
    d.shutdown()


@pytest.fixture
def api(daemon):
    with api_in_thread(daemon) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield http


def test_submit_json_and_yaml_then_list_and_get(api):
    r1 = api.post("/v1/jobs", json=tiny_spec("a"))
    r2 = api.post(
        "/v1/jobs",
        content=yaml.safe_dump(tiny_spec("b")),
        headers={"Content-Type": "application/yaml"},
    )
    assert (r1.status_code, r2.status_code) == (201, 201)
    ids = [r1.json()["id"], r2.json()["id"]]
    assert ids[0].startswith("a-") and ids[1].startswith("b-")
    listed = api.get("/v1/jobs").json()
    assert listed["next_cursor"] is None  # one page holds them
    listed = listed["jobs"]
    assert [j["id"] for j in listed] == ids  # queue order
    assert {j["state"] for j in listed} == {"queued"}
    rec = api.get(f"/v1/jobs/{ids[0]}").json()
    assert rec["spec"]["global_batch_size"] == 24
    assert [(t["from_state"], t["to_state"], t["reason"]) for t in rec["transitions"]] == [
        (None, "queued", "submitted")
    ]
    assert api.get("/v1/jobs", params={"state": "running"}).json()["jobs"] == []


@pytest.mark.parametrize(
    "spec, status, message",
    [
        # a field out of range: the path and the value
        (
            tiny_spec(global_batch_size=0),
            422,
            "global_batch_size: Input should be greater than or equal to 1 (got 0)",
        ),
        # a nested field: the dotted path
        (
            tiny_spec(optimizer={"name": "rmsprop"}),
            422,
            "optimizer.name: Input should be 'adamw' or 'sgd'",
        ),
        # unknown field
        (tiny_spec(colour="red"), 422, "colour: Extra inputs are not permitted"),
        # not a mapping
        ([1, 2], 422, "a job spec is a mapping of fields, got list"),
        # elastic: more devices than it selects; a priority out of range
        (
            tiny_spec(devices=tiny_spec()["devices"] | {"min_count": 4}),
            422,
            "devices: min_count=4 is more than the 3 device(s) selected; allowed: 1 to 3",
        ),
        (
            tiny_spec(priority=-5000),
            422,
            "priority: Input should be greater than or equal to -1000",
        ),
        # checkpoints outside the checkpoint root
        (
            tiny_spec(checkpoint={"dir": "../../etc"}),
            422,
            "checkpoint.dir: '../../etc' is outside the checkpoint root",
        ),
        (tiny_spec(checkpoint={"dir": "/tmp/x"}), 422, "checkpoint.dir: '/tmp/x' is outside"),
        # code the daemon was not told to trust
        (
            tiny_spec(task="subprocess:getoutput", task_args={"cmd": "id"}),
            422,
            "task: task='subprocess:getoutput' is not in a module this daemon allows",
        ),
    ],
)
def test_invalid_specs_answer_422_with_the_field_path(api, spec, status, message):
    r = api.post("/v1/jobs", json=spec)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert api.get("/v1/jobs").json()["jobs"] == []  # nothing was queued


def test_checkpoint_dir_inside_the_root_is_accepted_and_resolved(api, daemon):
    r = api.post("/v1/jobs", json=tiny_spec(checkpoint={"dir": "team/run1"}))
    assert r.status_code == 201
    rec = api.get(f"/v1/jobs/{r.json()['id']}").json()
    assert rec["spec"]["checkpoint"]["dir"] == str(daemon.checkpoint_root / "team" / "run1")


def causal_lm_spec(model_dir: str, data: str) -> dict:
    return tiny_spec(
        task="causal_lm", task_args={"model_dir": model_dir, "data": data}, max_seq_len=64
    )


def test_the_built_in_fine_tune_runs_by_default_reading_only_inside_the_data_roots(tmp_path):
    root = tmp_path / "data"
    (root / "model").mkdir(parents=True)
    (root / "train.jsonl").write_text("{}")
    (tmp_path / "escape").symlink_to("/etc")
    d = Daemon(tmp_path / "state", run_jobs=False, data_roots=(root,))
    d.start()
    try:
        with api_in_thread(d) as url, httpx.Client(base_url=url, timeout=30) as http:
            inside = causal_lm_spec(str(root / "model"), str(root / "train.jsonl"))
            assert http.post("/v1/jobs", json=inside).status_code == 201  # no --task-module
            for field, spec in [
                ("model_dir", causal_lm_spec("/etc", str(root / "train.jsonl"))),
                ("data", causal_lm_spec(str(root / "model"), "/etc/passwd")),
                ("data", causal_lm_spec(str(root / "model"), str(root / ".." / "x.jsonl"))),
                ("model_dir", causal_lm_spec(str(tmp_path / "escape"), str(root / "t.jsonl"))),
            ]:
                r = http.post("/v1/jobs", json=spec)
                assert r.status_code == 422, r.text
                (problem,) = r.json()["errors"]
                assert problem["loc"] == ["task_args", field]
                assert "outside the data roots this daemon reads from" in problem["msg"]
    finally:
        d.shutdown()


@pytest.mark.parametrize(
    "body, ctype, message",
    [
        (b"{not json", "application/json", "the body is not valid JSON"),
        (b"a: [1, 2", "application/yaml", "the body is not valid YAML"),
        (b"\xff\xfe", "application/json", "the body is not UTF-8: byte 0xff at offset 0"),
    ],
)
def test_unparsable_bodies_answer_422(api, body, ctype, message):
    r = api.post("/v1/jobs", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 422 and message in r.json()["detail"]


def test_bodies_over_1_mib_answer_413(api):
    big = json.dumps(tiny_spec(task_args={"pad": "x" * (1 << 20)}))
    r = api.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "over 1048576 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: the cap counts what arrives
        for _ in range(17):
            yield b"x" * 65536

    r = api.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


@pytest.mark.parametrize("size", [(1 << 20) + 1, 8 << 20])
def test_a_client_that_sends_its_whole_body_before_reading_gets_the_413(daemon, size):
    # Python's urllib writes the whole body, then reads: a server that answers and closes
    # without reading the rest resets the connection, and the client never sees the 413.
    import urllib.error
    import urllib.request

    with api_in_thread(daemon) as url:
        request = urllib.request.Request(
            f"{url}/v1/jobs", data=b"x" * size, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413
    assert "over 1048576 bytes" in json.loads(refused.value.read())["detail"]


def test_a_spec_the_daemon_would_store_over_the_limit_answers_413(daemon):
    # 2,400 simulated devices: a valid spec of 170 KB that is 280 KB as stored (defaults added)
    sims = [{"name": f"sim-{i:04d}-{'x' * 50}", "memory": "1MiB"} for i in range(2400)]
    spec = tiny_spec(devices={"select": "simulated", "simulated": sims})
    with api_in_thread(daemon) as url:
        r = httpx.post(f"{url}/v1/jobs", json=spec, timeout=60)
        assert r.status_code == 413, r.text
        assert "the daemon stores at most 262144 (max_spec_bytes)" in r.json()["detail"]
        assert httpx.get(f"{url}/v1/jobs").json()["jobs"] == []
    with api_in_thread(daemon, limits=Limits(max_spec_bytes=1 << 20)) as url:
        assert httpx.post(f"{url}/v1/jobs", json=spec, timeout=60).status_code == 201


def test_jobs_are_listed_a_page_at_a_time_in_queue_order(api):
    ids = [api.post("/v1/jobs", json=tiny_spec(f"j{i}")).json()["id"] for i in range(5)]
    api.post(f"/v1/jobs/{ids[1]}/cancel")
    first = api.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["jobs"]] == ids[:2] and first["next_cursor"]
    late = api.post("/v1/jobs", json=tiny_spec("late")).json()["id"]  # pages do not shift
    second = api.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    third = api.get("/v1/jobs", params={"limit": 2, "cursor": second["next_cursor"]}).json()
    assert [j["id"] for j in second["jobs"] + third["jobs"]] == [*ids[2:], late]
    assert third["next_cursor"] is None
    queued = api.get("/v1/jobs", params={"state": "queued", "limit": 3}).json()
    rest = api.get("/v1/jobs", params={"state": "queued", "cursor": queued["next_cursor"]})
    assert [j["id"] for j in queued["jobs"] + rest.json()["jobs"]] == [ids[0], *ids[2:], late]
    assert len(api.get("/v1/jobs").json()["jobs"]) == 6  # the default page holds 100


@pytest.mark.parametrize(
    "params, message",
    [
        ({"limit": 0}, "query.limit"),  # at least 1
        ({"limit": 1001}, "query.limit"),  # at most Limits.max_page
        ({"cursor": "abc"}, "query.cursor"),  # a cursor is what next_cursor gave
        ({"cursor": "9" * 19}, "query.cursor"),  # beyond SQLite's integers
    ],
)
def test_bad_page_parameters_answer_422(api, params, message):
    r = api.get("/v1/jobs", params=params)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == message.split(".")


def test_a_long_log_is_tailed_from_its_end(api, daemon):
    job_id = api.post("/v1/jobs", json=tiny_spec()).json()["id"]
    with daemon.log_path(job_id).open("a") as f:  # 3 MB: tails read blocks from the end
        f.writelines(f"line {i} {'.' * 60}\n" for i in range(50_000))
    full = daemon.log_path(job_id).read_text()
    for tail in (1, 3, 2000):
        got = api.get(f"/v1/jobs/{job_id}/logs", params={"tail": tail}).text
        assert got == "".join(full.splitlines(True)[-tail:])
    assert api.get(f"/v1/jobs/{job_id}/logs", params={"tail": 0}).text == full


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v1/jobs/nope-1234"),
        ("POST", "/v1/jobs/nope-1234/cancel"),
        ("GET", "/v1/jobs/nope-1234/logs"),
    ],
)
def test_unknown_ids_answer_404(api, method, path):
    r = api.request(method, path)
    assert r.status_code == 404 and r.json()["detail"] == "no job with id 'nope-1234'"


def test_cancel_a_queued_job_then_again_is_a_conflict(api):
    job_id = api.post("/v1/jobs", json=tiny_spec()).json()["id"]
    assert api.post(f"/v1/jobs/{job_id}/cancel").json() == {"id": job_id, "state": "cancelled"}
    r = api.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 409 and "already cancelled" in r.json()["detail"]
    rec = api.get(f"/v1/jobs/{job_id}").json()
    assert rec["transitions"][-1]["reason"] == "cancelled by request while queued"
    assert re.search("cancelled.* while queued", api.get(f"/v1/jobs/{job_id}/logs").text)


def test_logs_tail_and_follow_of_a_finished_job(api):
    job_id = api.post("/v1/jobs", json=tiny_spec()).json()["id"]
    api.post(f"/v1/jobs/{job_id}/cancel")
    full = api.get(f"/v1/jobs/{job_id}/logs").text
    assert len(full.splitlines()) == 2
    assert api.get(f"/v1/jobs/{job_id}/logs", params={"tail": 1}).text == full.splitlines(True)[-1]
    followed = api.get(f"/v1/jobs/{job_id}/logs", params={"follow": "true"}).text
    assert followed == full  # a terminal job's stream ends


def test_metrics_exposes_job_states_and_passes_promtool(api):
    api.post("/v1/jobs", json=tiny_spec())
    r = api.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'autobatch_jobs{state="queued"} 1' in r.text
    assert 'autobatch_jobs{state="running"} 0' in r.text
    if shutil.which("promtool"):
        check = subprocess.run(
            ["promtool", "check", "metrics"], input=r.content, capture_output=True, timeout=30
        )
        assert check.returncode == 0, check.stdout + check.stderr


def test_openapi_schema_is_published_with_the_job_spec(api):
    schema = api.get("/openapi.json").json()
    assert set(schema["paths"]) >= {
        "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/logs",
        "/healthz", "/metrics",
    }  # fmt: skip
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/JobSpec"}
    assert "global_batch_size" in schema["components"]["schemas"]["JobSpec"]["properties"]


def test_a_kept_alive_connection_answers_at_once(api):
    # Each answer is two writes (head, body): without TCP_NODELAY the body waited for the
    # client's delayed ACK, 40 ms a request (bench_daemon.py: 44 ms with one client).
    job_id = api.post("/v1/jobs", json=tiny_spec()).json()["id"]
    took = []
    for _ in range(21):
        t0 = time.perf_counter()
        assert api.get(f"/v1/jobs/{job_id}").status_code == 200
        took.append(time.perf_counter() - t0)
    assert sorted(took)[10] < 0.02, f"median {sorted(took)[10] * 1000:.0f} ms"


def test_a_job_whose_progress_holds_nan_is_still_served_as_json(api, daemon):
    job_id = api.post("/v1/jobs", json=tiny_spec()).json()["id"]
    daemon.store.update(job_id, progress={"step": 3, "loss": float("nan"), "rate": float("inf")})
    r = api.get(f"/v1/jobs/{job_id}")  # a diverged loss: strict JSON has no NaN (it was a 500)
    assert r.status_code == 200 and r.json()["progress"] == {"step": 3, "loss": None, "rate": None}


def test_a_spec_with_thousands_of_problems_answers_a_bounded_422(api):
    spec = tiny_spec() | {f"unknown_{i}": i for i in range(5000)}
    r = api.post("/v1/jobs", json=spec)
    assert r.status_code == 422 and len(r.content) < 32_000
    assert r.json()["detail"].endswith("... (5000 problems in all)")
    assert len(r.json()["errors"]) == 50


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _answer(sock: socket.socket) -> bytes:
    """What the server sent until it closed the connection (b"": closed without a word)."""
    out = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            out += chunk
    return out


def test_slow_clients_are_cut_off_at_the_deadlines(daemon):
    limits = Limits(header_timeout_s=0.5, body_timeout_s=0.5)
    with api_in_thread(daemon, limits=limits) as url:
        head = _connect(url)  # a request head that never ends
        head.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n")
        body = _connect(url)  # a body that never ends
        body.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        idle = _connect(url)  # nothing at all
        t0 = time.monotonic()
        assert _answer(head) == b"" and _answer(idle) == b""
        answer = _answer(body)
        assert time.monotonic() - t0 < 3
        assert answer.startswith(b"HTTP/1.1 408 ") and b"within 0.5 s" in answer
        assert httpx.get(f"{url}/healthz").status_code == 200


def test_connections_over_the_cap_are_closed_at_once(daemon):
    with api_in_thread(daemon, limits=Limits(max_connections=4)) as url:
        held = [_connect(url) for _ in range(4)]
        time.sleep(0.2)
        extra = _connect(url)
        extra.settimeout(2)
        assert extra.recv(1) == b""  # closed by the server at once (waiting would time out)
        for sock in held:
            sock.close()
        time.sleep(0.2)
        assert httpx.get(f"{url}/healthz").status_code == 200


def test_bodies_beyond_the_memory_budget_answer_503_until_it_frees(daemon):
    with api_in_thread(daemon, limits=Limits(max_buffered=100_000)) as url:
        slow = _connect(url)  # holds 80 KB of the budget while it sends the rest slowly
        spec = json.dumps(tiny_spec(task_args={"pad": "x" * 80_000})).encode()
        slow.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(spec), spec[:80_000])
        )
        time.sleep(0.3)
        r = httpx.post(f"{url}/v1/jobs", json=tiny_spec(task_args={"pad": "y" * 30_000}))
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "holds 100000 bytes of request bodies already" in r.json()["detail"]
        slow.sendall(spec[80_000:])
        assert b" 422 " in slow.recv(64)  # tiny_gpt takes no `pad`; the budget is free
        r = httpx.post(f"{url}/v1/jobs", json=tiny_spec(task_args={"pad": "y" * 30_000}))
        assert r.status_code == 422


def _children(pid: int) -> set[int]:
    out = set()
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # ppid
            out.add(int(stat.parent.name))
    return out


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="reads /proc")
def test_body_parser_processes_are_replaced_when_killed_and_end_with_the_daemon(tmp_path):
    d = DaemonProcess(tmp_path / "state", tmp_path / "cache", "--api-only")
    try:
        assert d.http.post("/v1/jobs", json=tiny_spec()).status_code == 201
        (daemon,) = _children(d.proc.pid)  # under `autobatch serve` (--api-only: no standby)
        parsers = _children(daemon)
        assert len(parsers) >= 2  # the parser processes (and multiprocessing's tracker)
        for pid in parsers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        r = d.http.post("/v1/jobs", json=tiny_spec())
        assert r.status_code == 503 and "parser's process died; retry" in r.json()["detail"]
        assert d.http.post("/v1/jobs", json=tiny_spec()).status_code == 201  # a new pool
        parsers = _children(daemon)
        d.kill()  # SIGKILL: no clean-up in the daemon
        deadline = time.monotonic() + 10
        while parsers & {int(p.name) for p in pathlib.Path("/proc").glob("[0-9]*")}:
            assert time.monotonic() < deadline, f"left behind: {parsers}"
            time.sleep(0.1)
    finally:
        d.stop()


def test_sigterm_stops_the_daemon_through_its_shutdown(tmp_path):
    d = DaemonProcess(tmp_path / "state", tmp_path / "cache", "--api-only")
    assert d.http.post("/v1/jobs", json=tiny_spec()).status_code == 201  # parsers running
    d.stop()  # SIGTERM; uvicorn raised it again after its own stop: the process died there
    assert d.proc.returncode == 0
    log = (tmp_path / "state-daemon.log").read_text()
    assert "Traceback" not in log and "leaked semaphore" not in log, log


# -- auth ------------------------------------------------------------------------------


@pytest.fixture
def secured(daemon):
    with api_in_thread(daemon, token=TOKEN) as url:
        yield url


@pytest.mark.parametrize(
    "headers",
    [
        {},  # no header
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},  # right secret, wrong scheme
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
)
@pytest.mark.parametrize("path", ["/v1/jobs", "/metrics", "/openapi.json", "/v1/jobs/x"])
def test_with_a_token_every_route_but_healthz_needs_it(secured, headers, path):
    r = httpx.get(secured + path, headers=headers)
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"]


def test_with_the_token_requests_pass_and_healthz_is_open(secured):
    assert httpx.get(secured + "/healthz").json()["status"] == "ok"
    client = DaemonClient(secured, token=TOKEN)
    job_id = client.submit(yaml.safe_dump(tiny_spec()))
    assert client.job(job_id)["state"] == "queued"
    with pytest.raises(ClientError, match="401: missing or wrong token"):
        DaemonClient(secured).jobs()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.4", "::", "example.org"])
def test_non_loopback_bind_without_a_token_is_refused(host):
    with pytest.raises(ServeError, match=f"--host {host} is not a loopback address"):
        check_bind(host, None)
    check_bind(host, "t")  # with a token: allowed


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_bind_needs_no_token(host):
    check_bind(host, None)


# -- the command line ----------------------------------------------------------------------


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """The `autobatch` entry point in this process (a subprocess costs seconds of imports)."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_against_the_daemon(daemon, tmp_path, capsys, monkeypatch):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec("clijob")))
    with api_in_thread(daemon) as url:
        monkeypatch.setenv("AUTOBATCH_SERVER", url)  # the server from the environment
        code, out, err = run_main(capsys, "submit", str(spec))
        assert code == 0, err
        job_id = out.strip()
        assert job_id.startswith("clijob-")
        code, out, _ = run_main(capsys, "jobs", "--server", url)
        assert job_id in out and "queued" in out
        _, out, _ = run_main(capsys, "status", job_id, "--json")
        assert json.loads(out)["state"] == "queued"
        _, out, _ = run_main(capsys, "status", job_id)
        assert "queued" in out and "submitted" in out
        assert run_main(capsys, "cancel", job_id)[1].strip() == f"{job_id}: cancelled"
        assert re.search("cancelled.* while queued", run_main(capsys, "logs", job_id, "-f")[1])


def test_cli_jobs_follows_every_page_or_stops_at_limit_with_a_hint(daemon, capsys):
    ids = [daemon.submit(tiny_spec(f"p{i}")) for i in range(5)]
    with api_in_thread(daemon, limits=Limits(default_page=2)) as url:  # 3 pages
        code, out, err = run_main(capsys, "jobs", "--server", url)
        assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ids
        assert err == ""
        code, out, err = run_main(capsys, "jobs", "--limit", "3", "--server", url)
        assert [line.split()[0] for line in out.splitlines()[1:]] == ids[:3]
        hint = err.strip()
        assert hint.startswith("more jobs: autobatch jobs --cursor ") and "--limit 3" in hint
        cursor = hint.split("--cursor ")[1].split()[0]
        _, out, err = run_main(capsys, "jobs", "--json", "--cursor", cursor, "--server", url)
        assert [j["id"] for j in json.loads(out)] == ids[3:] and err == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["status", "nope-1"], "error: 404: no job with id 'nope-1'"),
        (["cancel", "nope-1"], "error: 404: no job with id 'nope-1'"),
        (["submit", "no/such.yaml"], "error: cannot read job spec 'no/such.yaml'"),
        (["jobs", "--state", "sleeping"], "error: 422: query.state: Input should be"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(daemon, capsys, args, message):
    with api_in_thread(daemon) as url:
        code, _, err = run_main(capsys, *args, "--server", url)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(message), err


def test_cli_names_the_unreachable_server_from_the_environment(tmp_path):
    import os

    env = dict(os.environ, AUTOBATCH_SERVER="http://127.0.0.1:9")
    result = cli("jobs", env=env)
    assert result.returncode == 2
    assert result.stderr.startswith(
        "error: cannot reach the autobatch daemon at http://127.0.0.1:9"
    )


def test_cli_serve_refuses_a_public_address_without_a_token(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AUTOBATCH_TOKEN", raising=False)
    code, _, err = run_main(capsys, "serve", "--host", "0.0.0.0", "--state-dir", str(tmp_path))
    assert code == 2
    assert err.startswith("error: --host 0.0.0.0 is not a loopback address")
