"""Admission: what a spec shows can never run is refused before anything is queued or
reserved, through the doors users use (the daemon's HTTP API with a 422 naming the field;
`autobatch run` and `autobatch submit` with one line), and a daemon reads only inside its
data roots, symlinks resolved.

The drills are the two absurd specs of the operators' report: global_batch_size 10^7
over a dataset of 16 samples, with epoch_end drop (no full batch fits an epoch) and with
carry (it would run, but one step's input is far beyond the job's simulated devices).
"""

from __future__ import annotations

import httpx
import pytest
import ray
import yaml
from daemon_util import TINY, api_in_thread, tiny_spec

from autobatch.planning.plan import DeviceCapacity
from autobatch.planning.planner import make_plan
from launcher.cli import main
from launcher.daemon.daemon import Daemon
from launcher.errors import LaunchError
from launcher.job.bounds import MAX_PLAN_MICRO_BATCHES, MAX_STEPS, check_plan, spec_problems
from launcher.job.spec import JobSpec, SpecError, parse_spec


def absurd(epoch_end: str) -> dict:
    return tiny_spec(
        f"absurd-{epoch_end}",
        global_batch_size=10**7,
        task_args={**TINY, "dataset_size": 16},
        epoch_end=epoch_end,
    )


# -- what the spec shows (pure) -------------------------------------------------------------


@pytest.mark.parametrize(
    "over, problem",
    [
        # the drills: no full batch fits an epoch; one step's input beyond every device's memory
        (
            {"global_batch_size": 10**7, "task_args": {**TINY, "dataset_size": 16}},
            "global_batch_size=10000000 is larger than the dataset (16 samples): with "
            "epoch_end drop no full global batch fits in an epoch",
        ),
        (
            {
                "global_batch_size": 10**7,
                "task_args": {**TINY, "dataset_size": 16},
                "epoch_end": "carry",
            },
            "one global batch of 10,000,000 samples is 915.5 MiB of input (96 bytes a sample), "
            "more than the 112.0 MiB of all the job's simulated devices together",
        ),
        # the dataset exactly one global batch: runs
        ({"global_batch_size": 96}, None),
        # carry over a batch larger than the dataset, within the devices' memory: runs
        ({"global_batch_size": 200, "epoch_end": "carry"}, None),
        # epochs of a dataset of known size: bounded in steps
        (
            {"max_steps": None, "epochs": 1e9},
            f"epochs=1e+09 of 96 samples in global batches of 24 is 4,000,000,000 steps; at "
            f"most {MAX_STEPS:,} are allowed",
        ),
        ({"max_steps": None, "epochs": 1000}, None),
        # a task whose data only the task knows: nothing to say before it runs
        ({"task": "mypkg.tasks:build", "task_args": {}, "global_batch_size": 10**7}, None),
        # GPUs: their host memory is unknown before probing (the plan's size is bounded)
        (
            {
                "global_batch_size": 10**6,
                "epoch_end": "carry",
                "devices": {"select": "count", "count": 2},
            },
            None,
        ),
    ],
)
def test_what_the_spec_shows_can_never_run(over, problem):
    spec = JobSpec.model_validate(tiny_spec(**over))
    problems = spec_problems(spec)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p.msg for p in problems), problems
        assert {p.loc for p in problems} <= {("global_batch_size",), ("epochs",)}


def test_max_steps_is_bounded_in_the_spec():
    with pytest.raises(
        SpecError, match=f"max_steps: Input should be less than or equal to {MAX_STEPS}"
    ):
        parse_spec(tiny_spec(max_steps=MAX_STEPS + 1))
    assert parse_spec(tiny_spec(max_steps=MAX_STEPS)).max_steps == MAX_STEPS


def _plan(global_batch: int, limits: list[int], memory: int | None, simulated: bool = True):
    devices = [
        DeviceCapacity(f"b{i}", f"sim-{i}", m, 0.01, 0.001, 0.0, memory_bytes=memory,
                       simulated=simulated)
        for i, m in enumerate(limits)
    ]  # fmt: skip
    return make_plan(global_batch, devices, keep_all=True)


def test_a_plan_is_bounded_in_micro_batches_and_on_simulated_devices_in_a_steps_input():
    spec = JobSpec.model_validate(tiny_spec(global_batch_size=100_000, epoch_end="carry"))
    # 100,000 samples at micro-batches of at most 2: 50,000 micro-batches a step
    with pytest.raises(
        LaunchError, match=f"50,000 micro-batches a step .* the {MAX_PLAN_MICRO_BATCHES:,}"
    ):
        check_plan(spec, _plan(100_000, [2, 2], memory=1 << 30))
    # 50,000 samples of 96 bytes on one rank: 4.6 MiB of input on a 4 MiB device
    with pytest.raises(
        LaunchError, match=r"rank 0 \(sim-0\) would hold 4.6 MiB of input .* 4.0 MiB"
    ):
        check_plan(spec, _plan(50_000, [4096], memory=4 << 20))
    check_plan(spec, _plan(50_000, [4096], memory=8 << 20))  # fits
    check_plan(spec, _plan(50_000, [4096], memory=4 << 20, simulated=False))  # a GPU's host


# -- the doors -----------------------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "state", run_jobs=False, data_roots=(tmp_path / "data",))
    d.start()
    yield d
    d.shutdown()


@pytest.fixture
def api(daemon):
    with api_in_thread(daemon) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield http


@pytest.mark.parametrize("epoch_end", ["drop", "carry"])
def test_the_absurd_specs_are_refused_at_submit_with_a_422_naming_the_field(api, epoch_end):
    r = api.post("/v1/jobs", json=absurd(epoch_end))
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert errors and all(e["loc"] == ["global_batch_size"] for e in errors)
    want = "no full global batch fits in an epoch" if epoch_end == "drop" else "no plan can hold"
    assert any(want in e["msg"] for e in errors)
    assert r.json()["detail"].startswith("invalid job spec: global_batch_size: ")
    assert api.get("/v1/jobs").json()["jobs"] == []  # nothing was queued


@pytest.mark.parametrize("epoch_end", ["drop", "carry"])
def test_the_absurd_specs_are_refused_by_autobatch_run_before_anything_is_reserved(
    tmp_path, capsys, epoch_end
):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(absurd(epoch_end)))
    code = main(["run", str(path), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2
    error = " ".join(err.split())  # one error, however the console wrapped it
    assert err.count("error:") == 1 and error.startswith(
        "error: invalid job spec: global_batch_size:"
    )
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()  # nothing reserved


def test_autobatch_submit_shows_the_daemons_refusal_in_one_line(daemon, tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(absurd("carry")))
    with api_in_thread(daemon) as url:
        code = main(["submit", str(path), "--server", url])
    err = capsys.readouterr().err
    assert code == 2 and " ".join(err.split()).startswith(
        "error: 422: invalid job spec: global_batch_size:"
    )


# -- data roots: a symlink inside a root that leads out ------------------------------------


def causal_lm_spec(model_dir: str, data: str) -> dict:
    return tiny_spec(
        task="causal_lm", task_args={"model_dir": model_dir, "data": data}, max_seq_len=64
    )


def test_a_symlink_inside_a_data_root_that_leads_out_is_refused_for_data_and_model_dir(
    api, tmp_path
):
    root, outside = tmp_path / "data", tmp_path / "outside"
    (root / "model").mkdir(parents=True)
    (root / "train.jsonl").write_text("{}")
    (outside / "model").mkdir(parents=True)
    (outside / "secret.jsonl").write_text("{}")
    (root / "models").symlink_to(outside / "model")  # inside the root by its name only
    (root / "more.jsonl").symlink_to(outside / "secret.jsonl")
    (root / "alias.jsonl").symlink_to(root / "train.jsonl")  # leads inside: fine
    model, data = str(root / "model"), str(root / "train.jsonl")
    assert (
        api.post("/v1/jobs", json=causal_lm_spec(model, str(root / "alias.jsonl"))).status_code
        == 201
    )
    for field, spec in [
        ("model_dir", causal_lm_spec(str(root / "models"), data)),
        ("data", causal_lm_spec(model, str(root / "more.jsonl"))),
    ]:
        r = api.post("/v1/jobs", json=spec)
        assert r.status_code == 422, r.text
        (problem,) = r.json()["errors"]
        assert problem["loc"] == ["task_args", field]
        assert "outside the data roots this daemon reads from" in problem["msg"]
    assert len(api.get("/v1/jobs").json()["jobs"]) == 1  # only the one inside
