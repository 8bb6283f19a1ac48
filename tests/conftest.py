"""Fixtures shared across test modules."""

import pytest
import ray


@pytest.fixture
def local_ray(tmp_path, monkeypatch):
    """A fresh local Ray of 4 CPUs for one test, with a profile cache of its own."""
    monkeypatch.setenv("AUTOBATCH_PROFILE_CACHE", str(tmp_path / "profiles"))
    # address="local": a new Ray even where `ray start` (or ray.cluster_utils) recorded a
    # cluster in /tmp/ray, which a bare ray.init() would join.
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=150 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """An S3-compatible server (moto's server mode) on 127.0.0.1 for one test, with one bucket
    ("autobatch"), and the environment botocore reads pointing at it (request it before
    `local_ray`: the ranks of a local Ray inherit the environment it starts with). Never any
    other network: no instance metadata, no shared credentials or config files."""
    from types import SimpleNamespace

    server_mod = pytest.importorskip("moto.server", reason="moto[server] (the test extra)")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
    }.items():
        monkeypatch.setenv(key, value)
    import fsspec
    import httpx

    httpx.post(f"{endpoint}/moto-api/reset", timeout=30)  # moto's state is per process
    fs = fsspec.filesystem("s3", endpoint_url=endpoint, skip_instance_cache=True)
    fs.mkdir("autobatch")
    yield SimpleNamespace(endpoint=endpoint, bucket="autobatch", fs=fs)
    server.stop()
