"""The Grafana dashboard against a real Prometheus that labels targets as the Prometheus Operator
does, scraping the daemon's real /metrics (bearer token) while two jobs run.

The Operator turns k8s/monitoring.yaml's ServiceMonitor into a scrape job that relabels every
target: `job` becomes the Service name, and namespace, service, pod, container and endpoint
are added; honorLabels unset means a target's own label of one of those names is renamed
exported_<name>. `operator_scrape_config` builds that configuration from the rendered
manifests (pod meta labels as Kubernetes service discovery would give them, on a static
loopback target). Every panel's query must then return one series per job (or per rank of
each job), with the legend telling them apart, and the $job_id variable must list both jobs.

Needs the `prometheus` binary (Debian: apt-get install prometheus; .ci/run installs it).
About 6 s: Prometheus (2.42) applies a new target's discovery after 5 s.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from daemon_util import api_in_thread
from k8s_util import K8S, find, render
from prometheus_util import prometheus

from autobatch.metrics.snapshot import RankSnapshot
from launcher.daemon.daemon import Daemon

DASHBOARD = K8S / "grafana" / "autobatch-dashboard.json"
TOKEN = "operator-style-token"
NAMESPACE = "autobatch"
SCRAPE_INTERVAL = "500ms"  # the ServiceMonitor's 15s, shortened for the test
JOBS = {  # two jobs as the daemon names them, on different devices
    "finetune-3f9a1c2e": [("gpu-a100-0", "NVIDIA A100-SXM4-80GB")] * 2,
    "sweep-0b7d44aa": [
        ("gpu-t4-0", "Tesla T4"),
        ("gpu-t4-1", "Tesla T4"),
        ("gpu-t4-1", "Tesla T4"),
    ],
}
RANKS = sum(len(r) for r in JOBS.values())

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="no prometheus binary (Debian: apt-get install prometheus)",
)


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def operator_scrape_config(target: str, token_file: Path) -> dict[str, Any]:
    """The scrape job the Prometheus Operator generates for k8s/monitoring.yaml's ServiceMonitor
    (endpoint 0), with the service discovery labels of the daemon's pod on a static target."""
    docs = render()
    sm = find(docs, "ServiceMonitor")
    svc = find(docs, "Service", "autobatch-daemon")
    deploy = find(docs, "Deployment", "autobatch-daemon")
    (endpoint,) = sm["spec"]["endpoints"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    pod = f"{deploy['metadata']['name']}-6d5f8c7b9-x2k4q"
    meta = {
        "__meta_kubernetes_namespace": NAMESPACE,
        "__meta_kubernetes_service_name": svc["metadata"]["name"],
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_container_name": container["name"],
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_endpoint_port_name": svc["spec"]["ports"][0]["name"],
        "__meta_kubernetes_endpoint_address_target_kind": "Pod",
        "__meta_kubernetes_endpoint_address_target_name": pod,
    }
    for k, v in svc["metadata"]["labels"].items():
        meta[f"__meta_kubernetes_service_label_{_sanitize(k)}"] = v
        meta[f"__meta_kubernetes_service_labelpresent_{_sanitize(k)}"] = "true"
    relabel: list[dict[str, Any]] = [
        {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"}
    ]
    for k, v in sm["spec"]["selector"]["matchLabels"].items():
        s = _sanitize(k)
        relabel.append(
            {
                "action": "keep",
                "source_labels": [
                    f"__meta_kubernetes_service_label_{s}",
                    f"__meta_kubernetes_service_labelpresent_{s}",
                ],
                "regex": f"({v});true",
            }
        )
    kind_name = [
        "__meta_kubernetes_endpoint_address_target_kind",
        "__meta_kubernetes_endpoint_address_target_name",
    ]
    job_source = (
        f"__meta_kubernetes_service_label_{_sanitize(sm['spec']['jobLabel'])}"
        if "jobLabel" in sm["spec"]
        else "__meta_kubernetes_service_name"
    )
    relabel += [
        {
            "action": "keep",
            "source_labels": ["__meta_kubernetes_endpoint_port_name"],
            "regex": endpoint["port"],
        },
        {
            "source_labels": kind_name,
            "separator": ";",
            "regex": "Node;(.*)",
            "target_label": "node",
        },
        {"source_labels": kind_name, "separator": ";", "regex": "Pod;(.*)", "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {
            "action": "drop",
            "source_labels": ["__meta_kubernetes_pod_phase"],
            "regex": "(Failed|Succeeded)",
        },
        {"source_labels": [job_source], "target_label": "job", "replacement": "${1}"},
        {"target_label": "endpoint", "replacement": endpoint["port"]},
    ]
    assert endpoint["authorization"]["type"] == "Bearer"
    return {
        "job_name": f"serviceMonitor/{NAMESPACE}/{sm['metadata']['name']}/0",
        "honor_labels": bool(endpoint.get("honorLabels", False)),
        "scrape_interval": SCRAPE_INTERVAL,
        "scrape_timeout": SCRAPE_INTERVAL,
        "metrics_path": endpoint.get("path", "/metrics"),
        "authorization": {"type": "Bearer", "credentials_file": str(token_file)},
        "static_configs": [{"targets": [target], "labels": meta}],
        "relabel_configs": relabel,
    }


def snapshots(step: int) -> list[RankSnapshot]:
    """What the daemon's sink gets from both jobs' ranks after `step` optimizer steps."""
    out = []
    for j, (job, ranks) in enumerate(JOBS.items()):
        for rank, (node, device) in enumerate(ranks):
            out.append(
                RankSnapshot(
                    job=job,
                    rank=rank,
                    node=node,
                    device=device,
                    device_uuid=f"GPU-{j}{rank}",
                    device_memory_total_bytes=(80 if "A100" in device else 16) * 2**30,
                    device_memory_used_bytes=2**30,
                    torch_memory_allocated_bytes=2**29,
                    torch_memory_reserved_bytes=2**30,
                    torch_memory_peak_bytes=2**30 + rank,
                    plan_predicted_peak_bytes=2**30,
                    micro_batch_size=8 + rank,
                    accumulation_steps=2,
                    rank_samples_per_step=16,
                    global_batch_size=16 * len(ranks),
                    plan_efficiency_ratio=0.9,
                    effective_global_batch_size=16 * len(ranks),
                    step_duration_s=0.2,
                    sync_wait_s=0.01,
                    rank_compute_s=0.1 + 0.01 * rank,
                    plan_predicted_compute_s=0.1,
                    train_loss=3.0 - 0.01 * step,
                    step_durations_s=(0.2, 0.3),
                    samples_processed_total=16 * step,
                    tokens_processed_total=16 * 128 * step,
                    optimizer_steps_total=step,
                    oom_events_total=0,
                    worker_restarts_total=0,
                    world_size=len(ranks),
                    resizes_total={"grew": 1} if j else {},  # a resized job, and one never
                )
            )
    return out


@pytest.fixture
def daemon_endpoint(tmp_path: Path) -> Iterator[str]:
    """The daemon's API with a token, its sink fed by two running jobs; yields host:port."""
    daemon = Daemon(tmp_path / "state", run_jobs=False)
    daemon.start()
    stop = threading.Event()

    def train() -> None:  # steps keep coming, so rates and histograms move
        step = 0
        while not stop.is_set():
            step += 1
            for s in snapshots(step):
                daemon.sink.push(s)
            stop.wait(0.1)

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    try:
        with api_in_thread(daemon, token=TOKEN) as url:
            yield url.removeprefix("http://")
    finally:
        stop.set()
        trainer.join(5)
        daemon.shutdown()


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def job_variable() -> tuple[str, str, str]:
    """The dashboard's job variable: (name, metric, label) of its label_values() query."""
    variables = [v for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    (var,) = variables
    m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
    assert m, var["query"]
    return var["name"], m.group(1), m.group(2)


def targets() -> list[dict[str, Any]]:
    return [t | {"panel": p["title"]} for p in dashboard()["panels"] for t in p["targets"]]


def substitute(expr: str, job_regex: str) -> str:
    name, _, _ = job_variable()
    expr = expr.replace("$__rate_interval", "1m").replace(f"${name}", job_regex)
    assert "$" not in expr, f"a variable the test does not know: {expr}"
    return expr


def problems(target: dict[str, Any], result: list[dict[str, Any]], jobs: set[str]) -> list[str]:
    """Why this panel query's answer does not show the jobs apart (empty: it does)."""
    _, _, label = job_variable()
    where = f"{target['panel']} [{target['refId']}]"
    if not result:
        return [f"{where}: no series"]
    out = []
    metrics = [r["metric"] for r in result]
    exported = {k for m in metrics for k in m if k.startswith("exported_")}
    if exported:
        out.append(f"{where}: Prometheus renamed clashing labels: {sorted(exported)}")
    wanted = re.findall(r"\{\{(\w+)\}\}", target["legendFormat"])
    missing = {w for m in metrics for w in wanted if not m.get(w)}
    if missing:
        out.append(f"{where}: legend labels missing from the series: {sorted(missing)}")
    legends = [re.sub(r"\{\{(\w+)\}\}", lambda g, m=m: m.get(g[1], ""), target["legendFormat"])
               for m in metrics]  # fmt: skip
    if len(set(legends)) != len(legends):
        out.append(f"{where}: series look the same in the legend: {sorted(legends)}")
    if target["expr"] == "autobatch_jobs":  # one series per state, Prometheus' job label
        return out
    per_job = collections.Counter(m.get(label) for m in metrics)
    by = re.search(rf"\bby \(({label}\b[^)]*)\)", target["expr"])
    # by (job_id, reason): one series per job and value of the other labels
    others = [o.strip() for o in by.group(1).split(",")[1:]] if by else []
    combos = len({tuple(m.get(o) for o in others) for m in metrics})
    want = {j: combos if by else len(JOBS[j]) for j in jobs}
    if per_job != want:
        out.append(f"{where}: series per {label} {dict(per_job)}, want {want}")
    return out


def query(prom: httpx.Client, expr: str) -> list[dict[str, Any]]:
    answer = prom.get("/api/v1/query", params={"query": expr}).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


@needs_prometheus
def test_every_panel_shows_each_job_apart_under_operator_relabelling(daemon_endpoint, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = operator_scrape_config(daemon_endpoint, token_file)
    service = find(render(), "Service", "autobatch-daemon")["metadata"]["name"]
    var, var_metric, var_label = job_variable()
    selections = {".*": set(JOBS)} | {job: {job} for job in JOBS}  # "All", then each job alone

    with prometheus(config, tmp_path) as prom:
        deadline, failures = time.monotonic() + 30, ["not queried yet"]
        while failures and time.monotonic() < deadline:
            time.sleep(0.5)
            failures = [
                f"{var}={regex}: {p}"
                for regex, jobs in selections.items()
                for t in targets()
                for p in problems(t, query(prom, substitute(t["expr"], regex)), jobs)
            ]
        assert not failures, "\n".join(failures)

        # the target is up under the Operator's job label, and the daemon's series keep it
        (up,) = query(prom, "up")
        assert up["metric"]["job"] == service and up["value"][1] == "1", up
        for series in query(prom, "autobatch_global_batch_size or autobatch_jobs"):
            assert series["metric"]["job"] == service, series["metric"]
            assert series["metric"]["namespace"] == NAMESPACE
        # the dashboard's job variable lists both jobs
        values = prom.get(f"/api/v1/label/{var_label}/values", params={"match[]": var_metric})
        assert set(values.json()["data"]) == set(JOBS)


def test_every_dashboard_variable_is_defined():
    names = {v["name"] for v in dashboard()["templating"]["list"]}
    for t in targets():
        used = set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval"}
        assert used <= names, (t["panel"], used - names)
