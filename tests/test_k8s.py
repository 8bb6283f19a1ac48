"""Offline checks of the Kubernetes manifests (k8s/), their kustomization, and the Dockerfile.

What `kubectl apply -k k8s/` would create is rendered here without a cluster (k8s_util; the
same as `kubectl kustomize` where kubectl is installed). Core kinds validate against the
Kubernetes JSON schemas that kubernetes-validate ships (strict: unknown fields fail); the
RayCluster against an allow-list of ray.io/v1 fields plus its pod templates as core
PodTemplateSpecs; the cross-references (Secret, Service port, head Service, PVCs, dashboard,
Ray version, GPU node labels, the image's CUDA and torch, the NetworkPolicy's selectors, the
namespace) against each other.
"""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import json
import re
import shutil
import sys
import types

import kubernetes_validate
import pytest
import yaml
from k8s_util import K8S, KUSTOMIZATION, ROOT, find, json_patch, kubectl_kustomize, render

MANIFESTS = ["raycluster.yaml", "daemon.yaml", "networkpolicy.yaml", "monitoring.yaml"]
K8S_VERSION = "1.31.0"  # validate against this Kubernetes release's schemas (shipped offline)
CORE_KINDS = {"Deployment", "Service", "PersistentVolumeClaim", "ConfigMap", "NetworkPolicy"}
TOKEN_SECRET = ("autobatch-token", "token")  # created by hand (docs), never applied from k8s/
GKE_COMPONENT = "components/gke"
OBJECT_STORE_COMPONENT = "components/object-store"
OBJECT_STORE_SECRET = "autobatch-object-store"  # created by hand (docs), like the token
# every combination an operator may switch on
COMPONENT_SETS = pytest.mark.parametrize(
    "components",
    [[], [GKE_COMPONENT], [OBJECT_STORE_COMPONENT], [GKE_COMPONENT, OBJECT_STORE_COMPONENT]],
    ids=["base", "gke", "object-store", "gke+object-store"],
)
CHECKPOINT_CLAIM = "autobatch-checkpoints"
# NVIDIA GPU Feature Discovery's nvidia.com/gpu.product -> GKE's cloud.google.com/gke-accelerator
GFD_TO_GKE = {"NVIDIA-A100-SXM4-80GB": "nvidia-a100-80gb", "Tesla-T4": "nvidia-tesla-t4"}

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
    """What `kubectl apply -k k8s/` applies."""
    return render()


def one(kind: str, name: str | None = None) -> dict:
    return find(all_docs(), kind, name)


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


def raycluster(docs: list[dict] | None = None) -> dict:
    return find(docs if docs is not None else all_docs(), "RayCluster")


def worker_groups(docs: list[dict] | None = None) -> list[dict]:
    return raycluster(docs)["spec"]["workerGroupSpecs"]


# ---------------------------------------------------------------------------
# parsing and core schemas


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_parses(name):
    docs = load(name)
    assert docs, f"{name} has no documents"
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= d.keys(), d
        assert d["metadata"].get("name")


@COMPONENT_SETS
def test_core_kinds_present_and_validate(components):
    docs = [d for d in render(components=components) if d["kind"] in CORE_KINDS]
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


@COMPONENT_SETS
def test_raycluster_pod_templates_validate_as_core(components):
    spec = raycluster(render(components=components))["spec"]
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


def test_the_token_secret_is_created_by_hand_and_referenced_by_name():
    # Not in k8s/: re-applying the manifests must never reset the token to a placeholder.
    assert not [d for d in all_docs() if d["kind"] == "Secret"]
    name, key = TOKEN_SECRET
    ref = env_of(daemon_container())["AUTOBATCH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (name, key)
    (endpoint,) = one("ServiceMonitor")["spec"]["endpoints"]
    creds = endpoint["authorization"]["credentials"]
    assert (creds["name"], creds["key"]) == (name, key)
    # the deployment guide's command creates exactly this Secret and key
    guide = (ROOT / "docs" / "kubernetes.md").read_text()
    assert re.search(rf"kubectl -n \S+ create secret generic {name} --from-literal={key}=", guide)


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


def test_servicemonitor_leaves_the_job_label_to_prometheus():
    # The Operator sets job=<Service>; honorLabels would let a target overwrite Prometheus'
    # own labels. The daemon exports job_id instead (tests/test_monitoring.py).
    (endpoint,) = one("ServiceMonitor")["spec"]["endpoints"]
    assert not endpoint.get("honorLabels", False)
    assert "jobLabel" not in one("ServiceMonitor")["spec"]


def test_servicemonitor_targets_the_daemon_service():
    sm = one("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svc = one("Service", "autobatch-daemon")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["type"] == "Bearer"


def test_dashboard_configmap_is_the_dashboard_file():
    cm = one("ConfigMap", "autobatch-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (embedded,) = cm["data"].values()
    source = (K8S / "grafana" / "autobatch-dashboard.json").read_text()
    assert embedded == source
    json.loads(embedded)


# ---------------------------------------------------------------------------
# the kustomization: one apply, the storage class, the GPU node labels


def test_kustomization_applies_every_manifest():
    spec = yaml.safe_load(KUSTOMIZATION.read_text())
    assert sorted(spec["resources"]) == sorted(MANIFESTS)
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == set(MANIFESTS), on_disk ^ set(MANIFESTS)
    kinds = {d["kind"] for d in all_docs()}
    assert kinds == CORE_KINDS | {"RayCluster", "ServiceMonitor"}


@COMPONENT_SETS
def test_the_offline_rendering_is_what_kubectl_kustomize_builds(components, tmp_path):
    root = K8S
    if components:  # a copy of k8s/ with the component switched on, as an operator would
        root = tmp_path / "k8s"
        shutil.copytree(K8S, root)
        spec = yaml.safe_load(KUSTOMIZATION.read_text())
        spec["components"] = components
        (root / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    built = kubectl_kustomize(root)
    if built is None:
        pytest.skip("neither kubectl nor kustomize on PATH (the offline rendering is tested)")

    def key(d: dict) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    ours = render(components=components)
    assert sorted(map(key, built)) == sorted(map(key, ours))
    theirs = {key(d): d for d in built}
    for d in ours:
        assert theirs[key(d)] == d, key(d)
    # kubectl applies in this order: the claims before the pods that mount them
    order = [d["kind"] for d in built]
    assert order.index("PersistentVolumeClaim") < order.index("Deployment")
    assert order.index("PersistentVolumeClaim") < order.index("RayCluster")


def test_checkpoint_volume_is_read_write_many_with_an_explicit_storage_class():
    pvc = one("PersistentVolumeClaim", "autobatch-checkpoints")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    placeholder = pvc["spec"]["storageClassName"]  # never the cluster's (RWO) default
    assert placeholder == "set-me-rwx-storage-class"
    # a valid name (lower-case DNS subdomain), so the API server accepts it and the claim's
    # events name it; the deployment guide tells what happens when it is left as is
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", placeholder)
    guide = (ROOT / "docs" / "kubernetes.md").read_text()
    assert placeholder in guide and "Pending" in guide
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for t in [g["template"] for g in worker_groups()]
        for v in t["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"autobatch-checkpoints"}


def test_gke_component_selects_each_group_by_gke_accelerator():
    base, gke = worker_groups(), worker_groups(render(components=[GKE_COMPONENT]))
    assert [g["groupName"] for g in base] == [g["groupName"] for g in gke]
    for b, g in zip(base, gke):
        product = b["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
        selector = g["template"]["spec"]["nodeSelector"]
        assert selector == {"cloud.google.com/gke-accelerator": GFD_TO_GKE[product]}, b["groupName"]
        # only the selector differs
        b2 = copy.deepcopy(b)
        b2["template"]["spec"]["nodeSelector"] = selector
        assert b2 == g
    pvc = find(render(components=[GKE_COMPONENT]), "PersistentVolumeClaim", "autobatch-checkpoints")
    assert pvc["spec"]["storageClassName"] == "standard-rwx"  # GKE Filestore CSI, RWX


@pytest.mark.parametrize("component", [GKE_COMPONENT, OBJECT_STORE_COMPONENT])
def test_components_refuse_reordered_worker_groups(component):
    # their `test` ops guard the list indices they patch
    spec = yaml.safe_load((K8S / component / "kustomization.yaml").read_text())
    (patch,) = [p for p in spec["patches"] if p["target"]["kind"] == "RayCluster"]
    rc = copy.deepcopy(raycluster())
    rc["spec"]["workerGroupSpecs"].reverse()
    with pytest.raises(ValueError, match="test failed"):
        json_patch(rc, yaml.safe_load(patch["patch"]))


# ---------------------------------------------------------------------------
# the deployment resumes: every pod that reads checkpoints mounts them at one path


def pod_specs(docs: list[dict] | None = None) -> dict[str, dict]:
    """Every pod template of the deployment by role: head, each worker group, the daemon."""
    docs = docs if docs is not None else all_docs()
    spec = raycluster(docs)["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]}
    pods |= {g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}
    pods["daemon"] = find(docs, "Deployment", "autobatch-daemon")["spec"]["template"]
    return pods


def checkpoint_mounts(template: dict) -> set[tuple[str, str | None]]:
    """(mountPath, subPath) of every mount of the checkpoint claim in a pod template."""
    pod = template["spec"]
    volumes = {
        v["name"]
        for v in pod.get("volumes", [])
        if v.get("persistentVolumeClaim", {}).get("claimName") == CHECKPOINT_CLAIM
    }
    return {
        (m["mountPath"], m.get("subPath"))
        for c in pod["containers"]
        for m in c.get("volumeMounts", [])
        if m["name"] in volumes
    }


def test_head_workers_and_daemon_mount_the_checkpoints_at_the_same_paths():
    # The job supervisors run on the head (the daemon's Ray node under Ray Client) and look
    # there for the checkpoint to resume from, which rank 0 wrote on a worker.
    mounts = {role: checkpoint_mounts(t) for role, t in pod_specs().items()}
    assert mounts["daemon"], "the daemon does not mount the checkpoint claim"
    for role, found in mounts.items():
        assert found == mounts["daemon"], f"{role}: {found} != the daemon's {mounts['daemon']}"
    args = daemon_container()["command"]
    root = args[args.index("--checkpoint-root") + 1]
    assert root in {path for path, _ in mounts["head"]}, f"the head has no {root}"


def test_the_head_does_no_training_work():
    # A rank's bundle asks for CPUs, so num-cpus "0" keeps every rank off the head; the
    # actors the daemon pins to the head ask for none, or they could not be placed there.
    from launcher.daemon.supervisor import JobSupervisor
    from launcher.job.collector import SnapshotCollector

    head = raycluster()["spec"]["headGroupSpec"]["rayStartParams"]
    assert head["num-cpus"] == "0" and head["num-gpus"] == "0", head
    for group in worker_groups():
        assert group["rayStartParams"].get("num-cpus") != "0", group["groupName"]
    for actor in (JobSupervisor, SnapshotCollector):
        assert actor._default_options.get("num_cpus") == 0, actor


def test_every_pod_writing_the_volume_runs_with_the_images_group():
    # fsGroup 100: the Ray image's user ray (uid 1000) is in group users (100), the group
    # the Dockerfile's COPY --chown=ray:users gives; where the storage driver applies fsGroup
    # the volume becomes writable by that group (docs/kubernetes.md: where it does not).
    assert "--chown=ray:users" in (ROOT / "Dockerfile").read_text()
    for role, template in pod_specs().items():
        security = template["spec"].get("securityContext", {})
        assert security.get("fsGroup") == 100, f"{role}: {security}"
        assert security.get("fsGroupChangePolicy") == "OnRootMismatch", role


def test_the_guides_init_container_fits_the_daemons_pod():
    # for RWX drivers that ignore fsGroup: it chowns the folders the pods mount to the image's
    # uid and the fsGroup, and is a valid addition to the daemon's pod as the guide shows it
    guide = (ROOT / "docs" / "kubernetes.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", guide, flags=re.S)]
    (snippet,) = [b for b in blocks if isinstance(b, dict) and "initContainers" in b]
    deployment = copy.deepcopy(one("Deployment", "autobatch-daemon"))
    pod = deployment["spec"]["template"]["spec"]
    pod.update(snippet)
    validate(deployment)
    (init,) = snippet["initContainers"]
    (mount,) = init["volumeMounts"]
    assert "subPath" not in mount
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == CHECKPOINT_CLAIM
    script = init["command"][-1]
    sub_paths = {sub for _, sub in checkpoint_mounts(deployment["spec"]["template"])}
    for sub in sub_paths:
        assert f"{mount['mountPath']}/{sub}" in script, sub
    assert f"chown 1000:{pod['securityContext']['fsGroup']} " in script


# ---------------------------------------------------------------------------
# the NetworkPolicy: Ray Client and the dashboard from the daemon only

RAY_CLIENT, RAY_DASHBOARD = 10001, 8265
ALL_TCP = set(range(1, 65536))


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against a pod's labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {
            "In": present and value in e.get("values", []),
            "NotIn": not present or value not in e.get("values", []),
            "Exists": present,
            "DoesNotExist": not present,
        }[e["operator"]]
        if not ok:
            return False
    return True


def ingress_ports(policy: dict, labels: dict[str, str]) -> set[int]:
    """The TCP ports of the selected pods that a pod with `labels`, in the policy's
    namespace, may connect to."""
    allowed: set[int] = set()
    for rule in policy["spec"].get("ingress", []):
        peers = rule.get("from")
        for peer in peers or []:
            assert set(peer) == {"podSelector"}, f"not handled here: {peer}"
        if peers and not any(selects(p["podSelector"], labels) for p in peers):
            continue
        for port in rule.get("ports") or [{"port": 1, "endPort": 65535}]:
            assert port.get("protocol", "TCP") == "TCP" and isinstance(port["port"], int), port
            allowed |= set(range(port["port"], port.get("endPort", port["port"]) + 1))
    return allowed


def pod_labels(docs: list[dict] | None = None) -> dict[str, dict[str, str]]:
    return {role: t["metadata"]["labels"] for role, t in pod_specs(docs).items()}


@COMPONENT_SETS
def test_networkpolicy_selects_the_head_only(components):
    docs = render(components=components)
    policy = find(docs, "NetworkPolicy", "autobatch-ray-head")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    selector = policy["spec"]["podSelector"]
    selected = {role for role, labels in pod_labels(docs).items() if selects(selector, labels)}
    assert selected == {"head"}, selected


@COMPONENT_SETS
def test_ray_client_and_dashboard_are_reachable_from_the_daemon_only(components):
    # Both bypass the daemon's token. The daemon's labels are read from its Deployment, so a
    # label renamed on either side fails here instead of cutting the daemon off its cluster.
    docs = render(components=components)
    policy = find(docs, "NetworkPolicy", "autobatch-ray-head")
    labels = pod_labels(docs)
    assert {RAY_CLIENT, RAY_DASHBOARD} <= ingress_ports(policy, labels["daemon"])
    for role, role_labels in labels.items():
        if role != "daemon":
            reached = ingress_ports(policy, role_labels) & {RAY_CLIENT, RAY_DASHBOARD}
            assert not reached, f"{role} reaches {reached}"
    assert not ingress_ports(policy, {"app": "anything-else"})
    # the daemon reaches Ray through the port the policy opens to it
    (daemon,) = pod_specs(docs)["daemon"]["spec"]["containers"]
    assert env_of(daemon)["RAY_ADDRESS"]["value"].endswith(f":{RAY_CLIENT}")


@COMPONENT_SETS
def test_ray_pods_reach_every_other_port_of_the_head(components):
    # GCS 6379, and the raylet, object manager, agent and worker ports Ray picks at random
    docs = render(components=components)
    policy = find(docs, "NetworkPolicy", "autobatch-ray-head")
    for role, labels in pod_labels(docs).items():
        if role != "daemon":
            assert ingress_ports(policy, labels) == ALL_TCP - {RAY_CLIENT, RAY_DASHBOARD}, role


# ---------------------------------------------------------------------------
# the namespace: in the kustomization, on every object, in every command of the guide


def namespace() -> str:
    ns = yaml.safe_load(KUSTOMIZATION.read_text()).get("namespace")
    assert ns and ns != "default", f"k8s/kustomization.yaml: namespace {ns!r}"
    return ns


@COMPONENT_SETS
def test_every_object_goes_to_the_kustomizations_namespace(components):
    ns = namespace()
    for d in render(components=components):
        assert d["metadata"].get("namespace") == ns, (d["kind"], d["metadata"]["name"])


# kubectl commands on cluster-scoped objects (or local files), which take no namespace
CLUSTER_SCOPED_COMMANDS = {
    ("get", "crd"),
    ("get", "nodes"),
    ("get", "storageclass"),
    ("get", "csidriver"),
    ("create", "namespace"),
    ("kustomize",),
}


def kubectl_commands(text: str) -> list[list[str]]:
    """The arguments of every `kubectl` command in a document's code (fenced blocks and
    inline code, which may wrap lines), each up to the line's end, a pipe or `&`."""
    fenced = re.findall(r"^\s*```[^\n]*\n(.*?)^\s*```", text, flags=re.M | re.S)
    rest = re.sub(r"^\s*```[^\n]*\n.*?^\s*```", "", text, flags=re.M | re.S)
    code = fenced + [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", rest)]
    return [m.group(1).split() for c in code for m in re.finditer(r"\bkubectl\b([^\n|&]*)", c)]


@pytest.mark.parametrize("doc", ["docs/kubernetes.md", "README.md"])
def test_every_kubectl_command_names_the_namespace(doc):
    ns = namespace()
    for args in kubectl_commands((ROOT / doc).read_text()):
        if tuple(args[:2]) in CLUSTER_SCOPED_COMMANDS or tuple(args[:1]) in CLUSTER_SCOPED_COMMANDS:
            continue
        assert args[:1] == ["-n"] and len(args) > 1, f"{doc}: kubectl {' '.join(args)}"
        # another product's namespace (kube-prometheus-stack's) is a placeholder
        assert args[1] == ns or args[1].startswith("<"), f"{doc}: kubectl {' '.join(args)}"


def test_the_plain_scrape_config_targets_the_kustomizations_namespace():
    guide = (ROOT / "docs" / "kubernetes.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", guide, flags=re.S)]
    (scrape,) = [b for b in blocks if isinstance(b, dict) and "scrape_configs" in b]
    (job,) = scrape["scrape_configs"]
    (static,) = job["static_configs"]
    (target,) = static["targets"]
    svc = one("Service", "autobatch-daemon")
    port = svc["spec"]["ports"][0]["port"]
    assert target == f"{svc['metadata']['name']}.{namespace()}.svc:{port}"


# ---------------------------------------------------------------------------
# object storage instead of the volume: credentials from a Secret, never in the files


def test_object_store_component_gives_every_pod_the_secret():
    docs = render(components=[OBJECT_STORE_COMPONENT])
    assert not [d for d in docs if d["kind"] == "Secret"]
    for role, template in pod_specs(docs).items():
        for c in template["spec"]["containers"]:
            assert c.get("envFrom") == [{"secretRef": {"name": OBJECT_STORE_SECRET}}], role
    for role, template in pod_specs().items():  # not without the component
        assert all("envFrom" not in c for c in template["spec"]["containers"]), role
    guide = (ROOT / "docs" / "kubernetes.md").read_text()
    assert re.search(rf"kubectl -n \S+ create secret generic {OBJECT_STORE_SECRET} ", guide)


def test_no_credential_is_written_in_the_manifests():
    for path in K8S.rglob("*.yaml"):
        text = path.read_text()
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            assert not re.search(rf"name:\s*{name}\s*\n\s*value:", text), f"{path}: {name}"


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


# rayproject/ray:<ray>-py<python>-gpu is an alias of one -cuXY platform, the one Ray's CI
# names as its default GPU platform (ci/ray_ci/docker_container.py: CUDA 12.1.1 -> cu121).
RAY_GPU_ALIAS = "cu121"
# the oldest NVIDIA driver branch that runs each CUDA the image may be built on
DRIVER_BRANCH = {"cu121": "R530", "cu124": "R550", "cu126": "R560", "cu128": "R570"}


def dockerfile_cuda(text: str) -> dict[str, list[str]]:
    """Every CUDA the Dockerfile names, as cuXY: the base image's (from Ray's tag scheme), the
    pinned torch wheel's local version, its wheel index, and the build-time check's."""
    tags = re.findall(r"^FROM\s+rayproject/ray:[\w.]+-py\d+-(\w+)\s*$", text, flags=re.M)
    return {
        "base": [RAY_GPU_ALIAS if t == "gpu" else t for t in tags],
        "torch": re.findall(r"\btorch==[\d.]+\+(\w+)", text),
        "index": re.findall(r"download\.pytorch\.org/whl/(\w+)", text),
        "check": [
            "cu" + a + b for a, b in re.findall(r"torch\.version\.cuda == '(\d+)\.(\d)'", text)
        ],
    }


def cuda_mismatch(text: str) -> str | None:
    found = dockerfile_cuda(text)
    if any(len(v) != 1 for v in found.values()):
        return f"expected exactly one of each: {found}"
    values = {v[0] for v in found.values()}
    if len(values) != 1 or not next(iter(values)).startswith("cu"):
        return f"the image's CUDA builds disagree: {found}"
    return None


def test_dockerfile_torch_is_built_for_the_base_images_cuda():
    text = (ROOT / "Dockerfile").read_text()
    assert cuda_mismatch(text) is None, cuda_mismatch(text)
    cuda = dockerfile_cuda(text)["base"][0]
    # pinned before the project is installed, so `pip install .` keeps it (torch>=2.4)
    assert text.index("torch==") < text.index("pip install --no-cache-dir .")
    # the comment tells operators the driver this CUDA needs
    assert f"{DRIVER_BRANCH[cuda]} or newer" in text


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("-py311-cu126", "-py311-gpu"),  # the alias is CUDA 12.1
        ("whl/cu126", "whl/cu130"),  # a CUDA 13 index
        ("torch==2.13.0+cu126", "torch>=2.4"),  # unpinned: PyPI's CUDA 13 build
        ("torch.version.cuda == '12.6'", "torch.version.cuda == '13.0'"),
    ],
)
def test_a_dockerfile_whose_cuda_builds_disagree_is_refused(old, new):
    text = (ROOT / "Dockerfile").read_text()
    assert old in text
    assert cuda_mismatch(text.replace(old, new)) is not None


def test_dockerfile_ships_the_torch_the_tests_run():
    # the Makefile's TORCH_CPU is the torch every test runs on (make install)
    tested = re.search(r"^TORCH_CPU \?= torch==([\d.]+)$", (ROOT / "Makefile").read_text(), re.M)
    assert tested, "Makefile: no TORCH_CPU ?= torch==X.Y.Z"
    shipped = re.findall(r"\btorch==([\d.]+)\+cu\d+", (ROOT / "Dockerfile").read_text())
    assert shipped == [tested.group(1)], (shipped, tested.group(1))


# The build check, as the Dockerfile runs it (RUN python - <<'EOF' ... EOF).
def build_check() -> str:
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("# syntax=docker/dockerfile:1\n")  # heredocs: dockerfile 1.4+
    (body,) = re.findall(r"^RUN python - <<'EOF'\n(.*?)^EOF$", text, flags=re.M | re.S)
    return body


# TORCH_CUDA_ARCH_LIST of PyTorch's wheel builds (pytorch .ci/manywheel/build_cuda.sh)
CU126_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
CU128_ARCHS = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


def run_build_check(cuda: str, archs: list[str], monkeypatch) -> None:
    fake = types.SimpleNamespace(
        __version__=f"2.13.0+cu{cuda.replace('.', '')}",
        version=types.SimpleNamespace(cuda=cuda),
        cuda=types.SimpleNamespace(get_arch_list=lambda: list(archs)),
    )
    monkeypatch.setitem(sys.modules, "torch", fake)
    exec(compile(build_check(), "Dockerfile build check", "exec"), {"__name__": "__main__"})


def test_the_build_check_names_the_supported_cards():
    body = build_check()
    cards = re.search(r"^CARDS = (\{.*\})$", body, flags=re.M)
    assert cards and set(ast.literal_eval(cards.group(1)).values()) == {
        "sm_75",
        "sm_80",
        "sm_89",
        "sm_90",
    }
    assert "torch.cuda.get_arch_list()" in body


@pytest.mark.parametrize(
    ("cuda", "archs", "error"),
    [
        # the wheel the image installs: L4 (8.9) runs its sm_86 kernels
        ("12.6", CU126_ARCHS, None),
        # cu128's list would pass the arch check; its CUDA does not
        ("12.8", CU128_ARCHS, "CUDA 12.8"),
        # a CPU build has no kernels at all
        ("12.6", [], r"no kernels for \['T4 \(sm_75\)', 'A100"),
        # without sm_75 the T4 has nothing (sm_80 kernels do not run on 7.5)
        ("12.6", ["sm_80", "sm_86", "sm_90"], r"\['T4 \(sm_75\)'\]"),
        # sm_86 does not run on an A100 (8.0): a cubin runs on minor versions >= its own
        ("12.6", ["sm_75", "sm_86", "sm_90"], r"\['A100 \(sm_80\)'\]"),
        # sm_90a runs on the H100 itself; an sm_80 cubin serves the L4
        ("12.6", ["sm_75", "sm_80", "sm_90a"], None),
        # PTX for compute_75 is compiled on load for every newer card
        ("12.6", ["compute_75"], None),
        # nothing of major 9: the H100 has nothing
        ("12.6", ["sm_75", "sm_80", "sm_86"], r"\['H100 \(sm_90\)'\]"),
    ],
)
def test_the_build_check_refuses_a_torch_without_kernels_for_a_card(
    cuda, archs, error, monkeypatch
):
    if error is None:
        run_build_check(cuda, archs, monkeypatch)
    else:
        with pytest.raises(AssertionError, match=error):
            run_build_check(cuda, archs, monkeypatch)


def test_images_are_the_same_everywhere():
    images = {daemon_container()["image"]}
    spec = raycluster()["spec"]
    for t in [spec["headGroupSpec"]["template"]] + [g["template"] for g in worker_groups()]:
        images |= {c["image"] for c in t["spec"]["containers"]}
    assert len(images) == 1, images  # Ray Client needs the same Ray/Python on both sides
