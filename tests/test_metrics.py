"""Metrics: all of docs/metrics.md exposed, valid exposition, exact histograms, HTTP scrape."""

from __future__ import annotations

import gzip
import math
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from autobatch.metrics.prometheus import METRIC_NAMES, PrometheusSink
from autobatch.metrics.snapshot import JsonlSink, MetricsSink, RankSnapshot, plan_fields, read_jsonl
from autobatch.planning.plan import DeviceCapacity
from autobatch.planning.planner import make_plan

# docs/metrics.md, name by name, with the type Prometheus should see.
DESIGN_METRICS = [
    ("autobatch_device_memory_total_bytes", "gauge"),
    ("autobatch_device_memory_used_bytes", "gauge"),
    ("autobatch_torch_memory_allocated_bytes", "gauge"),
    ("autobatch_torch_memory_reserved_bytes", "gauge"),
    ("autobatch_torch_memory_peak_bytes", "gauge"),
    ("autobatch_plan_predicted_peak_bytes", "gauge"),
    ("autobatch_micro_batch_size", "gauge"),
    ("autobatch_accumulation_steps", "gauge"),
    ("autobatch_rank_samples_per_step", "gauge"),
    ("autobatch_global_batch_size", "gauge"),
    ("autobatch_effective_global_batch_size", "gauge"),
    ("autobatch_step_duration_seconds", "histogram"),
    ("autobatch_sync_wait_seconds", "gauge"),
    ("autobatch_rank_compute_seconds", "gauge"),
    ("autobatch_plan_predicted_compute_seconds", "gauge"),
    ("autobatch_samples_processed_total", "counter"),
    ("autobatch_tokens_processed_total", "counter"),
    ("autobatch_optimizer_steps_total", "counter"),
    ("autobatch_oom_events_total", "counter"),
    ("autobatch_replans_total", "counter"),
    ("autobatch_job_world_size", "gauge"),
    ("autobatch_resizes_total", "counter"),
    ("autobatch_rebalances_total", "counter"),
    ("autobatch_worker_restarts_total", "counter"),
    ("autobatch_plan_efficiency_ratio", "gauge"),
    ("autobatch_train_loss", "gauge"),
    ("autobatch_padding_waste_ratio", "gauge"),
    ("autobatch_checkpoint_stall_seconds", "gauge"),
    ("autobatch_checkpoint_write_seconds", "gauge"),
    ("autobatch_jobs", "gauge"),
]
RANK_LABELS = {"job_id", "rank", "node", "device", "device_uuid"}
JOB_FAMILIES = {  # per job, from its rank 0: labels of their own
    "autobatch_job_world_size": {"job_id"},
    "autobatch_resizes_total": {"job_id", "reason"},
    "autobatch_rebalances_total": {"job_id"},
}
# Labels Prometheus (or the Prometheus Operator's relabelling) sets on every series: a
# target's own label of the same name would be renamed exported_<name> (honor_labels false).
PROMETHEUS_OWNED = {"job", "instance", "namespace", "service", "pod", "container", "endpoint"}


def snap(job: str = "j1", rank: int = 0, **kw) -> RankSnapshot:
    """A snapshot with every field set (override any with keywords)."""
    values = dict(
        node="node-a",
        device="NVIDIA A100-SXM4-80GB",
        device_uuid=f"GPU-{rank:04d}",
        device_memory_total_bytes=80 * 2**30,
        device_memory_used_bytes=60 * 2**30,
        torch_memory_allocated_bytes=40 * 2**30,
        torch_memory_reserved_bytes=50 * 2**30,
        torch_memory_peak_bytes=45 * 2**30,
        plan_predicted_peak_bytes=44 * 2**30,
        micro_batch_size=8,
        accumulation_steps=3,
        rank_samples_per_step=23,
        global_batch_size=64,
        effective_global_batch_size=64,
        plan_efficiency_ratio=0.9,
        step_duration_s=0.5,
        sync_wait_s=0.05,
        rank_compute_s=0.4,
        plan_predicted_compute_s=0.375,
        train_loss=2.5,
        padding_waste_ratio=0.125,
        checkpoint_stall_s=0.002,
        checkpoint_write_s=0.25,
        step_durations_s=(0.5,),
        samples_processed_total=230,
        tokens_processed_total=23_000,
        optimizer_steps_total=10,
        oom_events_total=1,
        worker_restarts_total=2,
        replans_total={"oom": 1, "device_lost": 3},
        world_size=4,
        resizes_total={"grew": 2, "device_lost": 1},
        rebalances_total=2,
    )
    values.update(kw)
    return RankSnapshot(job=job, rank=rank, **values)


def families(text: bytes) -> dict:
    """Parsed exposition by exposed name (counters keep their _total)."""
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        out[name] = fam
    return out


def sample_set(text: bytes) -> set[tuple]:
    return {
        (s.name, frozenset(s.labels.items()), s.value)
        for fam in text_string_to_metric_families(text.decode())
        for s in fam.samples
    }


@pytest.fixture
def sink() -> PrometheusSink:
    s = PrometheusSink()
    s.push(snap("j1", 0))
    s.push(snap("j1", 1, node="node-b", device="Tesla T4"))
    s.set_job_states({"running": 1, "queued": 2})
    return s


def test_metric_names_are_exactly_those_of_the_design() -> None:
    assert sorted(METRIC_NAMES) == sorted(name for name, _ in DESIGN_METRICS)


@pytest.mark.parametrize(("name", "typ"), DESIGN_METRICS)
def test_every_design_metric_is_exposed_with_its_type_help_and_labels(
    sink: PrometheusSink, name: str, typ: str
) -> None:
    fam = families(sink.render())[name]
    assert fam.type == typ
    assert fam.documentation
    assert fam.samples, f"{name} has no samples"
    for s in fam.samples:
        if name == "autobatch_jobs":
            assert set(s.labels) == {"state"}
        elif name in JOB_FAMILIES:
            assert set(s.labels) == JOB_FAMILIES[name]
        else:
            extra = {"reason"} if name == "autobatch_replans_total" else set()
            extra |= {"le"} if s.name.endswith("_bucket") else set()
            assert set(s.labels) == RANK_LABELS | extra


def test_no_label_is_one_prometheus_sets(sink: PrometheusSink) -> None:
    labels = {k for f in families(sink.render()).values() for s in f.samples for k in s.labels}
    assert "job_id" in labels
    assert not labels & PROMETHEUS_OWNED, labels & PROMETHEUS_OWNED


def test_render_and_the_prometheus_client_collector_expose_the_same_samples(
    sink: PrometheusSink,
) -> None:
    assert sample_set(sink.render()) == sample_set(generate_latest(sink.registry))


def test_values_of_one_rank_are_exported_as_pushed(sink: PrometheusSink) -> None:
    fams = families(sink.render())

    def value(name: str, **labels: str) -> float:
        want = {"job_id": "j1", "rank": "1", **labels}
        (v,) = [s.value for s in fams[name].samples if want.items() <= s.labels.items()]
        return v

    assert value("autobatch_device_memory_total_bytes") == 80 * 2**30
    assert value("autobatch_rank_samples_per_step", device="Tesla T4") == 23
    assert value("autobatch_train_loss", node="node-b") == 2.5
    assert value("autobatch_replans_total", reason="device_lost") == 3
    assert value("autobatch_worker_restarts_total") == 2
    assert value("autobatch_rank_compute_seconds") == 0.4
    assert value("autobatch_plan_predicted_compute_seconds") == 0.375


# (buckets, durations of each push, expected cumulative count per le, the last is +Inf)
HISTOGRAM_CASES = [
    # one push; a duration equal to a bound counts in that bucket (le is "<=")
    ((0.1, 1.0), [[0.05, 0.1, 0.5, 2.0]], [2, 3, 4]),
    # pushes accumulate
    ((0.1, 1.0), [[0.05], [0.5, 0.7], [3.0]], [1, 3, 4]),
    # a snapshot without new steps changes nothing
    ((1.0,), [[0.2], []], [1, 1]),
    # everything above the last bound lands in +Inf only
    ((0.01, 0.02), [[5.0, 6.0]], [0, 0, 2]),
]


@pytest.mark.parametrize(("buckets", "pushes", "cumulative"), HISTOGRAM_CASES)
def test_histogram_counts_equal_the_pushed_durations(
    buckets: tuple[float, ...], pushes: list[list[float]], cumulative: list[int]
) -> None:
    s = PrometheusSink(buckets=buckets)
    for durations in pushes:
        s.push(snap(step_durations_s=durations))
    samples = families(s.render())["autobatch_step_duration_seconds"].samples
    got = [x.value for x in samples if x.name.endswith("_bucket")]
    assert got == cumulative
    everything = [d for p in pushes for d in p]
    (count,) = [x.value for x in samples if x.name.endswith("_count")]
    (total,) = [x.value for x in samples if x.name.endswith("_sum")]
    assert count == len(everything)
    assert math.isclose(total, sum(everything))


def test_a_rank_moved_to_another_device_starts_a_new_series() -> None:
    s = PrometheusSink(buckets=(1.0,))
    s.push(snap(device="Tesla T4", step_durations_s=(0.1, 0.2)))
    s.push(snap(device="NVIDIA L4", step_durations_s=(0.3,)))
    samples = families(s.render())["autobatch_step_duration_seconds"].samples
    assert {x.labels["device"] for x in samples} == {"NVIDIA L4"}
    assert [x.value for x in samples if x.name.endswith("_count")] == [1]


def test_drop_job_removes_only_that_jobs_series(sink: PrometheusSink) -> None:
    sink.push(snap("j2", 0))
    assert sink.drop_job("j1") == 2
    assert sink.drop_job("j1") == 0
    text = sink.render()
    assert b'job_id="j1"' not in text
    samples = [s for f in families(text).values() for s in f.samples]
    jobs = {s.labels["job_id"] for s in samples if "job_id" in s.labels}
    assert jobs == {"j2"}
    assert 'state="running"' in text.decode()  # the jobs gauge is the owner's, not dropped


# -- elastic jobs: world size, resizes, and the ranks a shrink leaves behind ---------------


def samples_of(sink: PrometheusSink) -> dict[str, list]:
    """Every parsed sample by sample name (counters with their _total)."""
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(sink.render().decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def job_values(sink: PrometheusSink, name: str, job: str) -> dict[str, float]:
    """A per-job family's values for one job: by reason, or under "" without one."""
    return {
        s.labels.get("reason", ""): s.value
        for s in samples_of(sink).get(name, [])
        if s.labels["job_id"] == job
    }


def ranks_of(sink: PrometheusSink, job: str) -> set[str]:
    """The ranks of `job` in any family of the exposition."""
    return {
        s.labels["rank"]
        for samples in samples_of(sink).values()
        for s in samples
        if s.labels.get("job_id") == job and "rank" in s.labels
    }


def test_a_shrunk_jobs_lost_ranks_leave_the_exposition() -> None:
    s = PrometheusSink()
    for r in range(3):
        s.push(snap("j", r, world_size=3, resizes_total={"grew": 1}))
    assert ranks_of(s, "j") == {"0", "1", "2"}
    assert job_values(s, "autobatch_job_world_size", "j") == {"": 3}
    resizes = job_values(s, "autobatch_resizes_total", "j")
    assert resizes == {"grew": 1, "shrank": 0, "device_lost": 0}  # known reasons from 0
    assert 'autobatch_job_world_size{job_id="j"} 3\n' in s.render().decode()
    assert 'autobatch_resizes_total{job_id="j",reason="grew"} 1\n' in s.render().decode()

    s.push(snap("j", 0, world_size=2, resizes_total={"grew": 1, "shrank": 1}))
    text = s.render().decode()
    assert 'rank="2"' not in text
    assert ranks_of(s, "j") == {"0", "1"}
    assert job_values(s, "autobatch_job_world_size", "j") == {"": 2}
    resizes = job_values(s, "autobatch_resizes_total", "j")
    assert resizes == {"grew": 1, "shrank": 1, "device_lost": 0}
    assert sample_set(s.render()) == sample_set(generate_latest(s.registry))

    s.push(snap("j", 1, world_size=2))  # a rank of the new group keeps its series
    s.push(snap("j", 0, world_size=3, resizes_total={"grew": 2, "shrank": 1}))
    s.push(snap("j", 2, world_size=3))  # grown back: rank 2 returns
    assert ranks_of(s, "j") == {"0", "1", "2"}
    assert job_values(s, "autobatch_job_world_size", "j") == {"": 3}


def test_world_size_and_resizes_of_two_jobs_do_not_interfere() -> None:
    s = PrometheusSink()
    for r in range(3):
        s.push(snap("a", r, world_size=3, resizes_total={"grew": 1}))
        s.push(snap("b", r, world_size=3, resizes_total={}))
    s.push(snap("a", 0, world_size=1, resizes_total={"grew": 1, "device_lost": 2}))
    assert ranks_of(s, "a") == {"0"} and ranks_of(s, "b") == {"0", "1", "2"}
    assert job_values(s, "autobatch_job_world_size", "a") == {"": 1}
    assert job_values(s, "autobatch_job_world_size", "b") == {"": 3}
    assert job_values(s, "autobatch_resizes_total", "a")["device_lost"] == 2
    assert set(job_values(s, "autobatch_resizes_total", "b").values()) == {0}
    assert sample_set(s.render()) == sample_set(generate_latest(s.registry))


def test_job_families_come_from_rank_0_only() -> None:
    s = PrometheusSink()
    s.push(snap("j", 1, world_size=2, resizes_total={"shrank": 7}))
    assert "autobatch_job_world_size" not in samples_of(s)  # no rank 0 yet: no job series
    s.push(snap("j", 0, world_size=2, resizes_total={"shrank": 1}))
    assert job_values(s, "autobatch_resizes_total", "j")["shrank"] == 1


def test_drop_job_removes_its_world_size_and_resizes() -> None:
    s = PrometheusSink()
    for r in range(2):
        s.push(snap("j", r, world_size=2, resizes_total={"grew": 1}))
        s.push(snap("k", r, world_size=2))
    assert s.drop_job("j") == 2
    fams = samples_of(s)
    for name in JOB_FAMILIES:
        assert {x.labels["job_id"] for x in fams[name]} == {"k"}
    assert b'job_id="j"' not in s.render()
    # the sink forgot j's world size (2): the same id's rank 0 with 2 ranks is news again
    for r in (1, 2):
        s.push(snap("j", r, world_size=3))
    s.push(snap("j", 0, world_size=2))
    assert ranks_of(s, "j") == {"0", "1"}


def test_job_states_from_a_callable_are_read_at_every_scrape() -> None:
    s = PrometheusSink()
    states = {"running": 1}
    s.set_job_states(lambda: states)
    states["running"] = 4
    (sample,) = families(s.render())["autobatch_jobs"].samples
    assert sample.labels == {"state": "running"} and sample.value == 4


def test_unmeasured_values_are_left_out_not_zero() -> None:
    s = PrometheusSink()
    s.push(
        snap(
            device="cpu",
            device_memory_total_bytes=None,
            device_memory_used_bytes=None,
            train_loss=None,
        )
    )
    fams = families(s.render())
    assert fams["autobatch_device_memory_total_bytes"].samples == []
    assert fams["autobatch_train_loss"].samples == []
    assert fams["autobatch_micro_batch_size"].samples[0].value == 8


def test_odd_label_values_are_escaped_and_parse_back() -> None:
    odd = 'GPU "big"\\x\nnext'
    s = PrometheusSink()
    s.push(
        snap(
            job='job "q"',
            device=odd,
            replans_total={'reason "r"': 1},
            resizes_total={'lost\n"x"': 1},
        )
    )
    fams = families(s.render())
    (sample,) = fams["autobatch_micro_batch_size"].samples
    assert sample.labels["device"] == odd and sample.labels["job_id"] == 'job "q"'
    assert fams["autobatch_replans_total"].samples[0].labels["reason"] == 'reason "r"'
    (world,) = fams["autobatch_job_world_size"].samples
    assert world.labels == {"job_id": 'job "q"'}
    reasons = {x.labels["reason"] for x in fams["autobatch_resizes_total"].samples}
    assert 'lost\n"x"' in reasons


def test_the_collector_has_its_own_registry_not_the_global_one(sink: PrometheusSink) -> None:
    other = PrometheusSink()  # a second one does not clash
    assert sink.registry is not REGISTRY and other.registry is not sink.registry
    assert b"autobatch_" not in generate_latest(REGISTRY)


def test_http_scrape_on_loopback_returns_the_exposition(sink: PrometheusSink) -> None:
    server, port = sink.serve()  # port 0: a free one
    try:
        assert port > 0 and server.url == f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(server.url, timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            body = resp.read()
        assert sample_set(body) == sample_set(sink.render())
        req = urllib.request.Request(server.url, headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(resp.read()) == body
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    finally:
        server.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=2)


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not on PATH (Debian: apt-get install prometheus)",
)
def test_promtool_accepts_the_exposition(sink: PrometheusSink) -> None:
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=sink.render(), capture_output=True, timeout=60
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_concurrent_pushes_and_scrapes_lose_no_step() -> None:
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so a missing lock shows
    s = PrometheusSink()
    n_threads, n_pushes = 4, 300

    def push(r: int) -> None:
        for _ in range(n_pushes):  # two ranks, each pushed from two threads
            s.push(snap(rank=r % 2, step_durations_s=(0.1, 0.2)))

    threads = [threading.Thread(target=push, args=(r,)) for r in range(n_threads)]
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            families(s.render())  # scrapes in between must always parse
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    samples = families(s.render())["autobatch_step_duration_seconds"].samples
    counts = [x.value for x in samples if x.name.endswith("_count")]
    assert counts == [2 * n_pushes * n_threads // 2] * 2  # 2 durations a push


# -- the snapshot value -----------------------------------------------------------


def test_snapshot_round_trips_through_json() -> None:
    s = snap(step_durations_s=[0.25, 0.5])
    assert s.step_durations_s == (0.25, 0.5)
    back = RankSnapshot.from_json(s.to_json())
    assert back == s
    assert back.world_size == 4 and back.resizes_total == {"grew": 2, "device_lost": 1}


def test_snapshot_copies_the_resizes_and_defaults_to_a_job_of_one_rank() -> None:
    resizes = {"grew": 1}
    s = snap(resizes_total=resizes)
    resizes["grew"] = 5  # the caller's mapping, not the snapshot's
    assert s.resizes_total == {"grew": 1} and type(s.resizes_total) is dict
    old = {k: v for k, v in snap().to_dict().items() if k not in ("world_size", "resizes_total")}
    s = RankSnapshot.from_dict(old)  # a snapshot written before elastic jobs
    assert s.world_size == 1 and s.resizes_total == {}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"job": ""}, "job must be a non-empty"),  # a series needs a job
        ({"rank": -1}, r"rank=-1 must be an integer >= 0"),
        ({"world_size": 0}, r"world_size=0 must be an integer >= 1"),
        ({"world_size": -1}, r"world_size=-1 must be an integer >= 1"),
        ({"world_size": True}, r"world_size=True must be an integer >= 1"),
        ({"world_size": "2"}, r"world_size='2' must be an integer >= 1"),
        ({"step_durations_s": (0.1, float("nan"))}, "durations must be finite"),
        ({"step_durations_s": (-0.1,)}, "durations must be finite and >= 0"),
    ],
)
def test_snapshot_rejects_values_that_would_corrupt_the_exposition(
    kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        snap(**kwargs)


def test_snapshot_from_dict_names_unknown_fields() -> None:
    data = {**snap().to_dict(), "gpu_temp": 70}
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['gpu_temp'\]"):
        RankSnapshot.from_dict(data)


def test_plan_fields_come_from_the_ranks_plan() -> None:
    devices = [
        DeviceCapacity(
            "a", "A100", 16, 0.01, 0.001, peak_fixed_bytes=100, peak_per_sample_bytes=10
        ),
        DeviceCapacity("b", "T4", 4, 0.01, 0.004, peak_fixed_bytes=100, peak_per_sample_bytes=10),
    ]
    plan = make_plan(40, devices)
    for r in plan.ranks:
        s = snap(rank=r.rank, **plan_fields(plan, r.rank))
        assert s.micro_batch_size == r.micro_batch_size
        assert s.accumulation_steps == r.accumulation_steps
        assert s.rank_samples_per_step == r.samples
        assert s.plan_predicted_peak_bytes == 100 + 10 * r.micro_batch_size
        assert s.global_batch_size == 40 and s.plan_efficiency_ratio == plan.efficiency


# -- other sinks ---------------------------------------------------------------------


def test_jsonl_sink_appends_one_line_per_snapshot(tmp_path) -> None:
    path = tmp_path / "runs" / "metrics.jsonl"
    pushed = [snap(rank=0), snap(rank=1, train_loss=float("nan"))]
    with JsonlSink(path) as sink:
        for s in pushed:
            sink.push(s)
    with JsonlSink(path) as sink:  # appends, does not truncate
        sink.push(pushed[0])
    got = read_jsonl(path)
    assert len(path.read_text().splitlines()) == 3
    assert got[0] == pushed[0] == got[2]
    assert math.isnan(got[1].train_loss)


def test_both_sinks_satisfy_the_sink_interface(tmp_path) -> None:
    with JsonlSink(tmp_path / "m.jsonl") as jsonl:
        assert isinstance(jsonl, MetricsSink)
    assert isinstance(PrometheusSink(), MetricsSink)


def test_metrics_module_needs_neither_torch_nor_ray() -> None:
    code = (
        "import sys, autobatch.metrics.snapshot; "
        "print(sorted(m for m in ('torch', 'ray', 'launcher') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- what a launcher rank reports -------------------------------------------------------


def _rank_snapshot(rank: int, world_size: int = 1) -> RankSnapshot:
    """The snapshot launcher.job.rankstats builds for `rank` after one step, on a plan of 3
    ranks (whatever process group it runs in) and a job resized once."""
    import torch

    from autobatch.probe.devices import cpu_device
    from autobatch.step.accumulate import StepResult
    from launcher.job.context import RankContext
    from launcher.job.rankstats import RankStats
    from launcher.job.spec import parse_spec

    devices = [DeviceCapacity(f"d{i}", "cpu", 4, 0.002, 0.001) for i in range(3)]
    plan = make_plan(12, devices)
    ctx = RankContext(
        job="t",
        spec=parse_spec({"name": "t", "global_batch_size": 12, "max_steps": 1}),
        precision="fp32",
        plan_json=plan.to_json(),
        rank=rank,
        device=cpu_device(),
        node="n",
        checkpoint_dir="/nonexistent",
        output_dir=None,
        resume_from=None,
        attempt=0,
        resizes={"shrank": 1},
    )
    stats = RankStats(ctx, plan, None)
    result = StepResult(
        loss=1.0, local_items=4, global_items=12, micro_steps=1, grad_norm=None,
        micro_step_s=(0.01,), global_samples=12,
    )  # fmt: skip
    stats.on_step(result, 0.02, plan, [[0, 1, 2, 3]], None, None, torch.device("cpu"))
    return stats.snapshot()


def test_a_rank_without_a_process_group_reports_a_world_of_one_not_the_plans() -> None:
    s = _rank_snapshot(0)
    assert s.world_size == 1  # the plan has 3 ranks: measured, not planned
    assert s.resizes_total == {"shrank": 1}


@pytest.mark.slow
def test_ranks_of_a_gloo_group_of_two_report_a_world_of_two() -> None:
    from distributed import run_ranks

    snaps = run_ranks(_rank_snapshot, 2)
    assert [(s.rank, s.world_size) for s in snaps] == [(0, 2), (1, 2)]  # the plan has 3
    assert all(s.resizes_total == {"shrank": 1} for s in snaps)
