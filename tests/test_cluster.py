"""The launcher on a real multi-node Ray cluster (ray.cluster_utils): one device per node,
and a node lost mid-run: the job is re-planned on the devices left, same global batch.

Three nodes of one CPU each, so the placement group's three one-CPU bundles land one per
node. The cluster is started and shut down by this module, apart from other tests' Ray.
"""

from __future__ import annotations

import json
import os

import pytest
import ray
from daemon_util import DaemonProcess
from ray.cluster_utils import Cluster
from test_launcher import SIMS_3, assert_every_global_batch_exact, assert_same_parameters, job

from launcher.job.controller import JobController
from launcher.job.events import Planned, Progress, Resized, RunnerEvent
from launcher.job.spec import parse_spec

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
