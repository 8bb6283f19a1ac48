"""Offline checks of the Kubernetes manifests (k8s/*.yaml) and the Dockerfile.

Core kinds validate against the Kubernetes JSON schemas that kubernetes-validate ships
(strict: unknown fields fail); the RayCluster against an allow-list of ray.io/v1 fields
plus its pod templates as core PodTemplateSpecs; the cross-references (Secret, Service
port, head Service, dashboard JSON, Ray version) against each other.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import pathlib
import re

import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
MANIFESTS = ["raycluster.yaml", "daemon.yaml", "monitoring.yaml"]
K8S_VERSION = "1.31.0"  # validate against this Kubernetes release's schemas (shipped offline)
CORE_KINDS = {"Deployment", "Service", "Secret", "PersistentVolumeClaim", "ConfigMap"}

# ray.io/v1 RayCluster fields (KubeRay CRD, ray.io_rayclusters.yaml)
RAYCLUSTER_SPEC_KEYS = {
    "autoscalerOptions",
    "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions",
    "headGroupSpec",
    "headServiceAnnotations",
    "managedBy",
    "rayVersion",
    "suspend",
    "workerGroupSpecs",
}
HEAD_GROUP_KEYS = {"enableIngress", "headService", "rayStartParams", "serviceType", "template"}
WORKER_GROUP_KEYS = {
    "groupName",
    "idleTimeoutSeconds",
    "maxReplicas",
    "minReplicas",
    "numOfHosts",
    "rayStartParams",
    "replicas",
    "scaleStrategy",
    "suspend",
    "template",
}


def load(name: str) -> list[dict]:
    with open(K8S / name) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def all_docs() -> list[dict]:
    return [d for name in MANIFESTS for d in load(name)]


def one(kind: str, name: str | None = None) -> dict:
    found = [
        d
        for d in all_docs()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def validate(obj: dict) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        kind, name = obj.get("kind"), obj.get("metadata", {}).get("name")
        pytest.fail(f"{kind}/{name}: {exc.message} at {list(exc.path)}")


def pod_template_doc(template: dict, name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": name},
        "template": template,
    }


def raycluster() -> dict:
    return one("RayCluster")


def worker_groups() -> list[dict]:
    return raycluster()["spec"]["workerGroupSpecs"]


# ---------------------------------------------------------------------------
# parsing and core schemas


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_parses(name):
    docs = load(name)
    assert docs, f"{name} has no documents"
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= d.keys(), d
        assert d["metadata"].get("name")


def test_core_kinds_present_and_validate():
    docs = [d for d in all_docs() if d["kind"] in CORE_KINDS]
    assert {d["kind"] for d in docs} == CORE_KINDS
    for d in docs:
        validate(d)


def test_validator_rejects_unknown_fields():
    # the strict validation above can fail: an unknown field must be an error
    deployment = copy.deepcopy(one("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


# ---------------------------------------------------------------------------
# RayCluster


def test_raycluster_uses_only_ray_io_v1_fields():
    rc = raycluster()
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC_KEYS, set(spec) - RAYCLUSTER_SPEC_KEYS
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_KEYS, set(head) - HEAD_GROUP_KEYS
    assert {"rayStartParams", "template"} <= set(head)
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_KEYS, set(group) - WORKER_GROUP_KEYS
        assert {"groupName", "rayStartParams", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for params in [head["rayStartParams"]] + [g["rayStartParams"] for g in worker_groups()]:
        # map[string]string in the CRD: a bare number or bool is rejected by the API server
        assert all(isinstance(v, str) for v in params.values()), params


def test_raycluster_pod_templates_validate_as_core():
    spec = raycluster()["spec"]
    templates = [("head", spec["headGroupSpec"]["template"])]
    templates += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    for name, template in templates:
        validate(pod_template_doc(template, name))


def test_raycluster_version_matches_installed_ray():
    assert raycluster()["spec"]["rayVersion"] == importlib.metadata.version("ray")


def test_two_gpu_worker_groups_of_different_types():
    groups = worker_groups()
    assert len(groups) == 2
    assert len({g["groupName"] for g in groups}) == 2
    products = []
    for g in groups:
        pod = g["template"]["spec"]
        product = pod["nodeSelector"]["nvidia.com/gpu.product"]
        products.append(product)
        (container,) = pod["containers"]
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
        shm_volumes = {
            v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"
        }
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get("/dev/shm") in shm_volumes, f"{g['groupName']}: no Memory /dev/shm"
    assert len(set(products)) == 2, products


def test_head_has_shm_and_client_port():
    pod = raycluster()["spec"]["headGroupSpec"]["template"]["spec"]
    (container,) = pod["containers"]
    shm = {v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
    assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/dev/shm"] in shm
    assert 10001 in {p["containerPort"] for p in container["ports"]}


# ---------------------------------------------------------------------------
# the daemon


def daemon_container() -> dict:
    (container,) = one("Deployment", "autobatch-daemon")["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def test_daemon_connects_to_the_raycluster_head_service():
    address = env_of(daemon_container())["RAY_ADDRESS"]["value"]
    head_svc = f"{raycluster()['metadata']['name']}-head-svc"
    m = re.fullmatch(r"ray://([\w.-]+):(\d+)", address)
    assert m, address
    assert m.group(1) == head_svc or m.group(1).startswith(head_svc + "."), m.group(1)
    assert m.group(2) == "10001"  # Ray Client: the daemon's pod runs no raylet


def test_daemon_token_from_the_secret():
    secret = one("Secret")
    ref = env_of(daemon_container())["AUTOBATCH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret.get("stringData", {}) | secret.get("data", {})


def test_daemon_binds_all_interfaces_and_uses_the_pvc():
    container = daemon_container()
    args = container["command"] + container.get("args", [])
    assert args[:2] == ["autobatch", "serve"]
    opts = dict(zip(args[2::2], args[3::2]))
    assert opts["--host"] == "0.0.0.0"
    port = int(opts["--port"])
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["http"] == port
    pod = one("Deployment", "autobatch-daemon")["spec"]["template"]["spec"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert claims[mounts[opts["--state-dir"]]] == "autobatch-state"
    one("PersistentVolumeClaim", "autobatch-state")
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
        assert container[probe]["httpGet"]["port"] in {"http", port}


def test_service_selects_the_daemon_pods():
    svc = one("Service", "autobatch-daemon")
    labels = one("Deployment", "autobatch-daemon")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["name"] == "http"
    assert port["targetPort"] in {"http", daemon_container()["ports"][0]["containerPort"]}


# ---------------------------------------------------------------------------
# monitoring


def test_servicemonitor_targets_the_daemon_service():
    sm = one("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svc = one("Service", "autobatch-daemon")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    auth = endpoint["authorization"]
    assert auth["type"] == "Bearer"
    secret = one("Secret")
    assert auth["credentials"]["name"] == secret["metadata"]["name"]
    assert auth["credentials"]["key"] in secret.get("stringData", {}) | secret.get("data", {})


def test_dashboard_configmap_equals_the_dashboard_file():
    cm = one("ConfigMap", "autobatch-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (embedded,) = cm["data"].values()
    source = (K8S / "grafana" / "autobatch-dashboard.json").read_text()
    assert json.loads(embedded) == json.loads(source)
    assert embedded == source  # verbatim, not merely equivalent


# ---------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_base_is_the_installed_ray_version():
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert len(froms) == 1, froms
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", froms[0])
    assert m, froms[0]
    assert m.group(1) == importlib.metadata.version("ray")
    assert "pip install --no-cache-dir ." in text
    cmd = re.search(r"^CMD\s+(\[.*\])", text, flags=re.MULTILINE)
    assert cmd, "no exec-form CMD"
    argv = json.loads(cmd.group(1))
    assert argv[:2] == ["autobatch", "serve"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert "--token" not in argv  # the token comes from AUTOBATCH_TOKEN, never the image


def test_images_are_the_same_everywhere():
    images = {daemon_container()["image"]}
    spec = raycluster()["spec"]
    for t in [spec["headGroupSpec"]["template"]] + [g["template"] for g in worker_groups()]:
        images |= {c["image"] for c in t["spec"]["containers"]}
    assert len(images) == 1, images  # Ray Client needs the same Ray/Python on both sides
