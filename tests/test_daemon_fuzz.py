"""Fuzz the daemon's API from its own OpenAPI schema (schemathesis): no answer is a 5xx.

Every operation, with generated path ids, query strings and job-spec bodies (valid and
not), against a real loopback server with a real store; jobs are queued, not run.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from daemon_util import api_in_thread  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from launcher.daemon.daemon import Daemon  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    daemon = Daemon(tmp_path_factory.mktemp("fuzz"), run_jobs=False)
    daemon.start()
    with api_in_thread(daemon) as url:
        yield url
    daemon.shutdown()


OPERATIONS = [
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/{job_id}"),
    ("POST", "/v1/jobs/{job_id}/cancel"),
    ("GET", "/v1/jobs/{job_id}/logs"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
]


def test_the_schema_lists_exactly_these_operations(server):
    loaded = schemathesis.openapi.from_url(f"{server}/openapi.json")
    found = {(op.method.upper(), op.path) for op in _operations(loaded)}
    assert found == set(OPERATIONS)


def _operations(loaded):
    return [r.ok() for r in loaded.get_all_operations()]


@pytest.mark.parametrize("method, path", OPERATIONS)
def test_no_request_gets_a_server_error(server, method, path):
    loaded = schemathesis.openapi.from_url(f"{server}/openapi.json")
    op = loaded[path][method]

    @settings(
        max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
    )
    @given(case=op.as_strategy())
    def check(case):
        if isinstance(case.query, dict) and str(case.query.get("follow")).lower() == "true":
            case.query["follow"] = "false"  # a queued job's log stream never ends
        case.call_and_validate(base_url=server, checks=[not_a_server_error], timeout=30)

    check()
