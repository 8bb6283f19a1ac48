"""The daemon's HTTP API on a real loopback server, with a real SQLite store, without Ray.

The daemon here does not run jobs (`run_jobs=False`): submitted jobs stay queued,
which is all the API's contract needs. Running jobs: tests/test_daemon_e2e.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest
import yaml
from daemon_util import ROOT, api_in_thread, tiny_spec

from launcher.cli import main
from launcher.daemon.client import ClientError, DaemonClient
from launcher.daemon.daemon import Daemon
from launcher.daemon.serve import ServeError, check_bind

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
    assert [j["id"] for j in listed] == ids  # queue order
    assert {j["state"] for j in listed} == {"queued"}
    rec = api.get(f"/v1/jobs/{ids[0]}").json()
    assert rec["spec"]["global_batch_size"] == 24
    assert [(t["from_state"], t["to_state"], t["reason"]) for t in rec["transitions"]] == [
        (None, "queued", "submitted")
    ]
    assert api.get("/v1/jobs", params={"state": "running"}).json() == []


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
    assert api.get("/v1/jobs").json() == []  # nothing was queued


def test_checkpoint_dir_inside_the_root_is_accepted_and_resolved(api, daemon):
    r = api.post("/v1/jobs", json=tiny_spec(checkpoint={"dir": "team/run1"}))
    assert r.status_code == 201
    rec = api.get(f"/v1/jobs/{r.json()['id']}").json()
    assert rec["spec"]["checkpoint"]["dir"] == str(daemon.checkpoint_root / "team" / "run1")


@pytest.mark.parametrize(
    "body, ctype, message",
    [
        (b"{not json", "application/json", "the body is not valid JSON"),
        (b"a: [1, 2", "application/yaml", "the body is not valid YAML"),
        (b"\xff\xfe", "application/json", "the body is not valid JSON"),
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
    assert "cancelled while queued" in api.get(f"/v1/jobs/{job_id}/logs").text


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
        assert "cancelled while queued" in run_main(capsys, "logs", job_id, "-f")[1]


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
