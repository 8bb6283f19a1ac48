"""k8s/kustomization.yaml rendered without kustomize, for the tests of the manifests.

Renders exactly the kustomize features k8s/ uses: `resources` (files), `components` (JSON 6902
`patches` with a target), `images`, `namespace` (every object of k8s/ is namespaced), and
`configMapGenerator` from files without a name hash.
Anything else in a kustomization is an error here, so a new feature cannot be silently
skipped; tests/test_k8s.py compares this rendering with `kubectl kustomize` where kubectl is
installed.
"""

from __future__ import annotations

import copy
import pathlib
import shutil
import subprocess
from typing import Any

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"

_KNOWN = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "components",
    "images",
    "configMapGenerator",
}
# kinds kustomize's namespace transformer leaves alone; none of them is in k8s/
_CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
_COMPONENT_KNOWN = {"apiVersion", "kind", "patches"}


def load_yaml_docs(path: pathlib.Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for p in parts:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    return doc


def json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add/replace/remove/test, as kustomize applies them (a failed test raises)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _pointer(op["path"])
        parent = _walk(doc, parents)
        key: Any = int(last) if isinstance(parent, list) and last != "-" else last
        kind = op["op"]
        if kind == "test":
            if _walk(parent, [last]) != op["value"]:
                raise ValueError(f"test failed at {op['path']}: {_walk(parent, [last])!r}")
        elif kind == "replace":
            _walk(parent, [last])  # must exist
            parent[key] = copy.deepcopy(op["value"])
        elif kind == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else key, copy.deepcopy(op["value"]))
            else:
                parent[key] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[key]
        else:
            raise ValueError(f"unsupported JSON patch op {kind!r}")
    return doc


def _matches(doc: dict[str, Any], target: dict[str, Any]) -> bool:
    group = doc["apiVersion"].rpartition("/")[0]
    checks = {
        "group": group,
        "kind": doc["kind"],
        "name": doc["metadata"]["name"],
    }
    unknown = set(target) - set(checks)
    assert not unknown, f"unsupported patch target fields {unknown}"
    return all(checks[k] == v for k, v in target.items())


def _set_images(node: Any, images: list[dict[str, str]]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    name, _, _tag = c["image"].partition(":")
                    for img in images:
                        if img["name"] == name:
                            new = img.get("newName", name)
                            c["image"] = f"{new}:{img['newTag']}" if "newTag" in img else new
            _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def render(
    kustomization: pathlib.Path = KUSTOMIZATION, *, components: list[str] | None = None
) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` builds from `kustomization` (order aside); `components`
    replaces the kustomization's own list (e.g. ["components/gke"])."""
    root = kustomization.parent
    spec = yaml.safe_load(kustomization.read_text())
    unknown = set(spec) - _KNOWN
    assert not unknown, f"{kustomization}: k8s_util.render does not handle {sorted(unknown)}"
    docs = [d for r in spec.get("resources", []) for d in load_yaml_docs(root / r)]
    for gen in spec.get("configMapGenerator", []):
        opts = gen.get("options", {})
        assert opts.get("disableNameSuffixHash"), "a hashed ConfigMap name is not handled here"
        files = [root / f for f in gen["files"]]
        meta: dict[str, Any] = {"name": gen["name"]}
        if opts.get("labels"):
            meta["labels"] = dict(opts["labels"])
        data = {f.name: f.read_text() for f in files}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    if components is None:
        components = spec.get("components") or []
    for comp in components:
        cspec = yaml.safe_load((root / comp / "kustomization.yaml").read_text())
        assert cspec["kind"] == "Component", comp
        unknown = set(cspec) - _COMPONENT_KNOWN
        assert not unknown, f"{comp}: k8s_util.render does not handle {sorted(unknown)}"
        for patch in cspec.get("patches", []):
            ops = yaml.safe_load(patch["patch"])
            hits = [i for i, d in enumerate(docs) if _matches(d, patch["target"])]
            assert hits, f"{comp}: patch target {patch['target']} matches nothing"
            for i in hits:
                docs[i] = json_patch(docs[i], ops)
    if spec.get("images"):
        _set_images(docs, spec["images"])
    if spec.get("namespace"):
        for d in docs:
            assert d["kind"] not in _CLUSTER_SCOPED, f"{d['kind']}: not handled here"
            d["metadata"]["namespace"] = spec["namespace"]
    return docs


def kubectl_kustomize(directory: pathlib.Path) -> list[dict[str, Any]] | None:
    """`kubectl kustomize directory` (or `kustomize build`), None where neither is installed."""
    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(directory)]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(directory)]
    else:
        return None
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]
