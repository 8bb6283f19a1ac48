"""A job on a multi-node Ray cluster (ray.cluster_utils) checkpointing to s3:// (a loopback
S3-compatible server): a rank killed with kill -9, and the job resumes at the checkpoint's
step with every global batch exact, the driver finding the checkpoint through the URI.

The nodes are started before the test's environment names the store (AWS_ENDPOINT_URL
and the credentials): their rank actors reach it only because the launcher passes the
standard variables on to them (launcher.job.controller `_storage_env_of`). Nothing is
written to a local folder.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest
import ray
from daemon_util import TINY, tiny_spec
from ray.cluster_utils import Cluster

from launcher.job.checkpoint import checkpoint_name, list_checkpoints
from launcher.job.controller import JobController
from launcher.job.spec import parse_spec

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from ledger import exact_global_batches, rank_lines  # noqa: E402 (benchmarks/ledger.py)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    saved = dict(os.environ)
    os.environ["AUTOBATCH_PROFILE_CACHE"] = str(tmp_path_factory.mktemp("profiles"))
    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 (Ray's own spelling)
    node = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def test_a_multi_node_job_on_s3_resumes_at_the_checkpoint_with_the_ledger_exact(
    two_nodes, s3, tmp_path
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
        parse_spec(spec), address=two_nodes.address, runs_root=str(tmp_path / "runs")
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
