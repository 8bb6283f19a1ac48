"""The launcher on a real multi-node Ray cluster (ray.cluster_utils): one device per node,
and a node lost mid-run: the job is re-planned on the devices left, same global batch.

Three nodes of one CPU each, so the placement group's three one-CPU bundles land one per
node. The cluster is started and shut down by this module, apart from other tests' Ray.

Also a job checkpointing to s3:// (a loopback S3-compatible server) whose rank is killed:
it resumes at the checkpoint's step with every global batch exact, the driver finding the
checkpoint through the URI. The nodes are started before the test's environment names
the store: their rank actors reach it only because the launcher passes the standard
variables on to them. Nothing is written to a local folder.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest
import ray
from daemon_util import TINY, DaemonProcess, tiny_spec
from ray.cluster_utils import Cluster
from test_launcher import SIMS_3, assert_every_global_batch_exact, assert_same_parameters, job

from launcher.job.checkpoint import checkpoint_name, list_checkpoints
from launcher.job.controller import JobController
from launcher.job.events import Planned, Progress, Resized, RunnerEvent
from launcher.job.spec import parse_spec

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from ledger import exact_global_batches, rank_lines  # noqa: E402 (benchmarks/ledger.py)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    saved = dict(os.environ)
    os.environ["AUTOBATCH_PROFILE_CACHE"] = str(tmp_path_factory.mktemp("profiles"))
    # Ray runs workers at nice 15; on 2 cores the GCS and the per-node agents, busy after
    # a node loss, then starve the training workers (minutes instead of seconds).
    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 (Ray's own spelling)
    node = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    # Declare a node dead after 3 missed 1 s health checks (default: 5 of 3 s).
    fast = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    head = {**node, "include_dashboard": False, "_system_config": fast}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    workers = [cluster.add_node(**node) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("sharding, min_count", [("none", 2), ("optimizer", None)])
def test_a_lost_node_is_replanned_on_the_devices_left_with_the_same_global_batch(
    three_nodes, tmp_path, sharding, min_count
):
    # Sharded: the shards 3 ranks saved (torch.distributed.checkpoint) load on the 2 left,
    # and the job ends with the parameters of the same job run replicated, uninterrupted.
    cluster, workers = three_nodes
    # slowed to a quarter, so that the node goes while the job trains
    slow = [{**d, "speed": 0.25} for d in SIMS_3]
    devices = {"select": "simulated", "simulated": slow, "keep_all": True, "min_count": min_count}
    spec = job(tmp_path, name="nodes", max_steps=10, devices=devices, sharding=sharding)
    seen: dict = {"nodes": set(), "removed": False}

    def listener(event: RunnerEvent) -> None:
        if isinstance(event, Resized):
            seen["resized"] = event
        if isinstance(event, Planned):
            seen["nodes"] = {d.node_id for d in event.devices}
        if not isinstance(event, Progress):
            return
        steps = [s.optimizer_steps_total for s in event.snapshots]
        if not seen["removed"] and min(steps) >= 2:
            seen["removed"] = True
            cluster.remove_node(workers[-1])  # a whole node, its raylet and workers

    try:
        summary = JobController(parse_spec(spec), address=cluster.address, listener=listener).run()
    finally:
        workers.append(cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20))
        cluster.wait_for_nodes()
    assert len(seen["nodes"]) == 3  # one device per node
    assert seen["removed"]
    assert summary.steps == 10 and summary.restarts == 1
    assert summary.replans == {"device_lost": 1}
    # the re-plan is a resize too (elastic with min_count 2, or not): the job shrank to 2
    assert summary.resizes == {"device_lost": 1}
    lost = seen["resized"]
    assert (lost.reason, lost.before, len(lost.devices)) == ("device_lost", (0, 1, 2), 2)
    assert summary.plan.world_size == 2 and summary.plan.sharding == sharding
    assert sum(r.samples for r in summary.plan.ranks) == 24
    assert_every_global_batch_exact(spec, tmp_path / "ckpt")
    if sharding != "none":
        reference = job(tmp_path / "ref", name="ref", max_steps=10, devices=devices)
        want = JobController(parse_spec(reference), address=cluster.address).run().parameters
        assert_same_parameters(summary.parameters, want)


def test_autobatch_serve_starts_its_own_head_beside_a_cluster_started_here(three_nodes, tmp_path):
    """`ray start` (here: ray.cluster_utils) records its cluster for a bare ray.init() to
    join; the daemon's head must be a new Ray of its own all the same (it was not: the
    head joined the other cluster and failed, and the daemon never started)."""
    cluster, _ = three_nodes
    daemon = DaemonProcess(tmp_path / "state", tmp_path / "profiles")
    try:
        head = json.loads((tmp_path / "state" / "ray-head.json").read_text())
        assert head["address"] != cluster.address
        assert daemon.http.get("/healthz").status_code == 200
    finally:
        daemon.stop()


def test_a_multi_node_job_on_s3_resumes_at_the_checkpoint_with_the_ledger_exact(
    three_nodes, s3, tmp_path
):
    uri = f"s3://{s3.bucket}/cluster/job"
    spec = tiny_spec(
        "s3-nodes",
        sims=("big", "mid"),
        max_steps=4,
        audit_samples=True,
        faults=[{"kind": "crash", "rank": 1, "step": 3}],
        checkpoint={"dir": uri, "interval": 2},
        output_dir=str(tmp_path / "final"),
    )
    summary = JobController(
        parse_spec(spec), address=three_nodes[0].address, runs_root=str(tmp_path / "runs")
    ).run()
    assert summary.steps == 4 and summary.restarts == 1
    assert [checkpoint_name(c) for c in list_checkpoints(uri)] == [
        "step_00000002.pt",
        "step_00000004.pt",
    ]
    retried = [json.loads(line) for _, line in rank_lines(uri)]
    assert min(e["step"] for e in retried if e["attempt"] == 1) == 2  # resumed at step 2
    assert exact_global_batches(uri, TINY["dataset_size"], 24, 1, 4)
    assert not (tmp_path / "runs").exists()  # no local copy of anything
