"""Checkpoints, the audit ledger and the trained model through a storage URI (s3://, on a
loopback S3-compatible server: moto's server mode, tests/conftest.py `s3`).

- A replica's job and a sharded job checkpoint to s3://, lose a rank (kill -9; the sharded
  one in the middle of a save, its shards written and its marker not), and resume at the
  last complete checkpoint's step with every global batch exact (the ledger's segment
  objects, read by benchmarks/ledger.py); nothing is written to the local runs folder.
- A checkpoint counts only when complete: shards without their marker are never listed,
  never resumed, and never push the only complete checkpoint out of retention.
- What cannot be written is refused at submit, before anything is reserved: a missing
  bucket, no credentials, an unreachable endpoint, a read-only local path (`autobatch run`:
  one line, exit 2; the daemon: a 422 naming checkpoint.dir). A URI carrying credentials is
  refused without being repeated.
"""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import sys

import httpx
import pytest
import ray
import torch
import yaml
from daemon_util import TINY, api_in_thread, tiny_spec

from autobatch.errors import StorageError
from autobatch.step.wrap import REPLICATED
from launcher.cli import main
from launcher.daemon.daemon import Daemon
from launcher.job.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
)
from launcher.job.policy import classify
from launcher.job.spec import SpecError, parse_spec
from launcher.job.train import _save_output

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from ledger import exact_global_batches, last_tries, rank_lines  # noqa: E402

N, B, SEED = TINY["dataset_size"], 24, 1


def run_job(tmp_path: pathlib.Path, spec: dict, capsys) -> tuple[int, str, str]:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = main(["run", str(path), "--runs-dir", str(tmp_path / "runs")])
    out, err = capsys.readouterr()
    return code, " ".join(out.split()), " ".join(err.split())


# -- jobs through s3:// ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "sharding, fault, resumed_at",
    [
        # a replica: kill -9 of rank 1 before step 3; resumes at the checkpoint of step 2
        ("none", {"kind": "crash", "rank": 1, "step": 3}, 2),
        # sharded: kill -9 of rank 0 in the middle of the save of step 4 (every rank's shards
        # and DCP's metadata written, the marker not): resumes at step 2, never at the partial
        ("optimizer", {"kind": "crash_in_save", "rank": 0, "step": 4}, 2),
    ],
)
def test_a_job_on_s3_resumes_at_its_last_complete_checkpoint_with_the_ledger_exact(
    s3, local_ray, tmp_path, capsys, sharding, fault, resumed_at
):
    uri = f"s3://{s3.bucket}/jobs/{sharding}"
    spec = tiny_spec(
        f"s3-{sharding}",
        sims=("big", "mid"),
        max_steps=4,
        sharding=sharding,
        audit_samples=True,
        faults=[fault],
        checkpoint={"dir": uri, "interval": 2},
    )
    code, out, err = run_job(tmp_path, spec, capsys)
    assert code == 0, err
    suffix = ".pt" if sharding == "none" else ""
    assert "restart 1:" in out and "done: 4 steps" in out
    # the attempt after the restart began at the last complete checkpoint's step, on every rank
    retried = [json.loads(line) for _, line in rank_lines(uri)]
    assert min(e["step"] for e in retried if e["attempt"] == 1) == resumed_at
    assert [checkpoint_name(c) for c in list_checkpoints(uri)] == [
        f"step_{s:08d}{suffix}" for s in (2, 4)
    ]
    assert exact_global_batches(uri, N, B, SEED, 4)  # the ledger's segments, last tries
    segments = s3.fs.find(f"{s3.bucket}/jobs/{sharding}/samples-rank0")
    assert segments and all(s.endswith(".jsonl") for s in segments)
    local = list((tmp_path / "runs").rglob("*")) if (tmp_path / "runs").exists() else []
    assert not [p for p in local if p.name.startswith(("step_", "samples-rank"))]


# -- completeness --------------------------------------------------------------------------------


def plant_partial(s3, prefix: str, step: int) -> None:
    """A sharded save killed before its marker: DCP's shards and metadata, no COMMITTED."""
    d = f"{s3.bucket}/{prefix}/step_{step:08d}"
    s3.fs.pipe_file(f"{d}/__0_0.distcp", b"shard")
    s3.fs.pipe_file(f"{d}/.metadata", b"metadata")


def test_shards_without_their_marker_are_never_listed_resumed_or_counted_by_retention(s3):
    uri = f"s3://{s3.bucket}/ckpt"
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plant_partial(s3, "ckpt", 1)  # older than any complete one: a crashed save's leftovers
    save_checkpoint(uri, 2, REPLICATED, model, opt, {"sampler": {"step": 2}}, keep=1)
    plant_partial(s3, "ckpt", 5)  # newer than the complete ones
    plant_partial(s3, "ckpt", 6)
    # a complete sharded checkpoint: its marker written last
    s3.fs.pipe_file(f"{s3.bucket}/ckpt/step_00000003/.metadata", b"metadata")
    s3.fs.pipe_file(f"{s3.bucket}/ckpt/step_00000003/COMMITTED", b"{}")
    assert [checkpoint_name(c) for c in list_checkpoints(uri)] == [
        "step_00000002.pt",
        "step_00000003",
    ]
    assert checkpoint_name(latest_checkpoint(uri)) == "step_00000003"
    save_checkpoint(uri, 4, REPLICATED, model, opt, {"sampler": {"step": 4}}, keep=2)
    left = sorted(p.rsplit("/", 1)[-1] for p in s3.fs.ls(f"{s3.bucket}/ckpt"))
    # the newest two complete kept; partials older than the newest complete removed, newer
    # ones left (a later save of their step replaces them)
    assert left == ["step_00000003", "step_00000004.pt", "step_00000005", "step_00000006"]
    assert checkpoint_name(latest_checkpoint(uri)) == "step_00000004.pt"


def test_the_ledger_reads_local_lines_and_object_store_segments_alike(s3, tmp_path):
    def line(step, attempt, idx):
        return json.dumps({"run": "r1", "attempt": attempt, "step": step, "micro_batches": [idx]})

    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "samples-rank0.jsonl").write_text(
        "\n".join([line(0, 0, [1, 2]), line(1, 0, [3]), line(1, 1, [4])]) + "\n"
    )
    base = f"{s3.bucket}/ckpt/samples-rank0"
    s3.fs.pipe_file(f"{base}/r1-a0000-000000.jsonl", (line(0, 0, [1, 2]) + "\n").encode())
    s3.fs.pipe_file(f"{base}/r1-a0000-000001.jsonl", (line(1, 0, [3]) + "\n").encode())
    s3.fs.pipe_file(f"{base}/r1-a0001-000000.jsonl", (line(1, 1, [4]) + "\n").encode())
    assert last_tries(local) == last_tries(f"s3://{s3.bucket}/ckpt") == {0: [1, 2], 1: [4]}


# -- refused at submit ---------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STORE_FAULTS = {
    # name: (checkpoint dir, environment change, the reason said)
    "missing bucket": ("s3://no-such-bucket/ckpt", {}, "no such bucket"),
    "no credentials": (
        "s3://autobatch/ckpt",
        {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
        "no credentials found",
    ),
    "unreachable endpoint": (
        "s3://autobatch/ckpt",
        {"AWS_ENDPOINT_URL": "closed"},
        "endpoint is unreachable",
    ),
}


def apply_env(monkeypatch, env: dict) -> None:
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        elif value == "closed":
            monkeypatch.setenv(key, f"http://127.0.0.1:{closed_port()}")
        else:
            monkeypatch.setenv(key, value)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder on a read-only file system (a tmpfs mounted ro; skipped where the machine
    does not allow a mount)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot run mount here ({exc})")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


@pytest.mark.parametrize("case", [*STORE_FAULTS, "read-only path"])
def test_autobatch_run_refuses_storage_it_cannot_write_before_anything_is_reserved(
    s3, tmp_path, capsys, monkeypatch, request, case
):
    if case == "read-only path":
        where, env, reason = str(request.getfixturevalue("read_only_dir") / "ckpt"), {}, None
        reason = "read-only"
    else:
        where, env, reason = STORE_FAULTS[case]
    apply_env(monkeypatch, env)
    spec = tiny_spec("refused", checkpoint={"dir": where, "interval": 2})
    code, out, err = run_job(tmp_path, spec, capsys)
    assert code == 2
    assert err.count("error:") == 1
    assert err.startswith(f"error: invalid job spec: checkpoint.dir: cannot write to {where}")
    assert reason in err
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()  # nothing reserved


@pytest.fixture
def api(tmp_path):
    daemon = Daemon(tmp_path / "state", run_jobs=False, data_roots=(tmp_path / "data",))
    daemon.start()
    with api_in_thread(daemon) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http
    daemon.shutdown()


@pytest.mark.parametrize("case", list(STORE_FAULTS))
def test_the_daemon_refuses_storage_it_cannot_write_with_a_422_naming_the_field(
    s3, api, monkeypatch, case
):
    where, env, reason = STORE_FAULTS[case]
    apply_env(monkeypatch, env)
    r = api.post("/v1/jobs", json=tiny_spec("refused", checkpoint={"dir": where}))
    assert r.status_code == 422, r.text
    [error] = r.json()["errors"]
    assert error["loc"] == ["checkpoint", "dir"] and reason in error["msg"]
    assert api.get("/v1/jobs").json()["jobs"] == []  # nothing was queued


def test_the_daemon_accepts_a_writable_bucket_and_keeps_the_uri(s3, api):
    uri = f"s3://{s3.bucket}/jobs/accepted"
    r = api.post("/v1/jobs", json=tiny_spec("accepted", checkpoint={"dir": uri}))
    assert r.status_code < 300, r.text
    assert len(api.get("/v1/jobs").json()["jobs"]) == 1  # queued (run_jobs=False: not started)
    assert s3.fs.find(f"{s3.bucket}/jobs") == []  # the probe object was deleted


SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYSECRETKEY"


@pytest.mark.parametrize(
    "field, value",
    [
        (("checkpoint", "dir"), f"s3://AKIAEXAMPLE:{SECRET}@bucket/ckpt"),
        (("checkpoint", "dir"), f"s3://bucket/ckpt?X-Amz-Signature={SECRET}"),
        (("output_dir",), f"gs://user:{SECRET}@bucket/final"),
    ],
)
def test_a_uri_carrying_credentials_is_refused_without_repeating_it(tmp_path, field, value):
    over = {"checkpoint": {"dir": value}} if field[0] == "checkpoint" else {"output_dir": value}
    with pytest.raises(SpecError, match=rf"{'.'.join(field)}: a storage URI") as info:
        parse_spec(tiny_spec("secret", **over))
    assert SECRET not in str(info.value)
    daemon = Daemon(tmp_path / "state", run_jobs=False, data_roots=(tmp_path / "data",))
    daemon.start()
    try:
        with api_in_thread(daemon) as url:
            r = httpx.post(f"{url}/v1/jobs", json=tiny_spec("secret", **over), timeout=30)
        assert r.status_code == 422 and SECRET not in r.text
        assert r.json()["errors"][0]["loc"] == list(field)
    finally:
        daemon.shutdown()
    logs = list((tmp_path / "state").rglob("*"))
    assert not any(SECRET in p.read_text(errors="ignore") for p in logs if p.is_file())


def test_a_save_to_a_missing_bucket_is_a_storage_fault_the_policy_does_not_retry(s3):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(StorageError, match="checkpoint of step 2: .*no such bucket") as info:
        save_checkpoint("s3://no-such-bucket/ckpt", 2, REPLICATED, model, opt, {})
    assert classify(info.value) == "storage"


def test_a_trained_model_for_a_uri_is_saved_locally_then_uploaded(s3):
    def save(model: torch.nn.Module, out_dir: str) -> None:
        pathlib.Path(out_dir, "adapter").mkdir()
        torch.save(model.state_dict(), pathlib.Path(out_dir, "adapter", "weights.pt"))
        pathlib.Path(out_dir, "config.json").write_text("{}")

    _save_output(save, torch.nn.Linear(2, 2), f"s3://{s3.bucket}/final")
    assert sorted(s3.fs.find(f"{s3.bucket}/final")) == [
        f"{s3.bucket}/final/adapter/weights.pt",
        f"{s3.bucket}/final/config.json",
    ]
