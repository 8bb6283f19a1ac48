"""Fixtures shared across test modules."""

import pytest
import ray


@pytest.fixture
def local_ray(tmp_path, monkeypatch):
    """A fresh local Ray of 4 CPUs for one test, with a profile cache of its own."""
    monkeypatch.setenv("AUTOBATCH_PROFILE_CACHE", str(tmp_path / "profiles"))
    # address="local": a new Ray even where `ray start` (or ray.cluster_utils) recorded a
    # cluster in /tmp/ray, which a bare ray.init() would join.
    ray.init(
        address="local", num_cpus=4, include_dashboard=False, object_store_memory=150 * 2**20
    )
    yield
    ray.shutdown()
