"""Reading the deployment files the way their tools do: YAML documents, a small kustomize
(resources + strategic-merge and JSON 6902 patches, the only features the overlays use), and
the schemas they are checked against."""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "kubernetes"
CLUSTER = REPO / "cluster"
SCHEMA = Path(__file__).with_name("schemas") / "kuberay-v1.7.0.schema.json"
K8S_VERSION = "1.33"  # Kubernetes schemas the core objects are checked against (KubeRay 1.7 era)

Doc = dict[str, Any]


def load_docs(path: Path) -> list[Doc]:
    """Every non-empty YAML document of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest_files() -> list[Path]:
    """Kubernetes objects (not kustomizations or patches) under kubernetes/."""
    out = []
    for path in sorted(KUBE.rglob("*.yaml")):
        docs = load_docs(path)
        objects = all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs)
        if docs and objects and not any(d["kind"] == "Kustomization" for d in docs):
            out.append(path)
    return out


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge as kustomize does it for maps (lists are replaced, which is what
    kustomize does for custom resources and for the ConfigMap fields patched here)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(patch)


def _matches(doc: Doc, target: dict[str, str]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    want = {
        "group": group,
        "version": version,
        "kind": doc["kind"],
        "name": doc["metadata"]["name"],
    }
    return all(want[k] == v for k, v in target.items() if k in want)


def kustomize(directory: Path) -> list[Doc]:
    """Render a kustomization directory (resources, patches with or without target)."""
    import jsonpatch

    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - {"apiVersion", "kind", "resources", "patches"}
    assert not unknown, f"{directory}: kustomize features this renderer does not know: {unknown}"
    docs: list[Doc] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        docs += kustomize(path) if path.is_dir() else load_docs(path)
    for patch in kust.get("patches", []):
        body = yaml.safe_load((directory / patch["path"]).read_text())
        if "target" in patch:
            hits = [i for i, d in enumerate(docs) if _matches(d, patch["target"])]
            assert len(hits) == 1, f"patch {patch['path']} matches {len(hits)} objects"
            ops = body if isinstance(body, list) else None
            assert ops is not None, f"{patch['path']}: a targeted patch here is a JSON 6902 list"
            docs[hits[0]] = jsonpatch.apply_patch(docs[hits[0]], ops)
        else:
            hits = [
                i
                for i, d in enumerate(docs)
                if (d["kind"], d["metadata"]["name"]) == (body["kind"], body["metadata"]["name"])
            ]
            assert len(hits) == 1, f"patch {patch['path']} matches {len(hits)} objects"
            docs[hits[0]] = _merge(docs[hits[0]], body)
    return docs


@functools.lru_cache(maxsize=4)
def kuberay_validator(kind: str):
    """A validator of one kind (RayJob, RayCluster) of the project's KubeRay schema, pod
    templates resolved against the strict Kubernetes core schema of kubernetes-validate."""
    import importlib.resources

    import jsonschema
    from referencing import Registry, Resource

    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    defs_dir = next(
        p
        for p in root.iterdir()
        if p.name.startswith(f"v{K8S_VERSION}.") and p.name.endswith("-local-strict")
    )
    k8s = json.loads((defs_dir / "_definitions.json").read_text())
    schema = json.loads(SCHEMA.read_text())
    if kind not in schema["$defs"]:
        raise KeyError(f"the KubeRay schema has no kind {kind!r}")
    registry = Registry().with_resources(
        [(k8s["$id"], Resource.from_contents(k8s)), (schema["$id"], Resource.from_contents(schema))]
    )
    entry = {"$schema": schema["$schema"], "$ref": f"{schema['$id']}#/$defs/{kind}"}
    return jsonschema.Draft202012Validator(entry, registry=registry)


def kuberay_errors(doc: Doc) -> list[str]:
    """Schema errors of a RayJob or RayCluster, deepest causes first ("path: message")."""
    validator = kuberay_validator(doc.get("kind", ""))
    out = []
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        out += [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _leaves(err)]
    return out


def _leaves(err) -> Iterator[Any]:
    if not err.context:
        yield err
        return
    for sub in err.context:
        yield from _leaves(sub)


def pod_templates(doc: Doc) -> Iterator[tuple[str, Doc]]:
    """(where, PodTemplateSpec) of a RayJob or RayCluster."""
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        if "submitterPodTemplate" in spec:
            yield "submitter", spec["submitterPodTemplate"]
        spec = spec["rayClusterSpec"]
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"worker group {group['groupName']}", group["template"]


def ray_cluster_spec(doc: Doc) -> Doc:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def entrypoint_commands(entrypoint: str) -> list[list[str]]:
    """A shell entrypoint split into its `&&`-joined commands."""
    return [shlex.split(part) for part in re.split(r"\s*&&\s*", entrypoint.strip())]


def dockerfile_facts() -> dict[str, str]:
    """Base image, work dir and the folders the Dockerfile copies into it."""
    text = (KUBE / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    workdir = re.search(r"^WORKDIR (\S+)$", text, flags=re.M)
    copies = re.findall(r"^COPY (?:--\S+ )*(\S+) (\S+)$", text, flags=re.M)
    return {
        "base_image": args["BASE_IMAGE"],
        "ray_version": args["RAY_VERSION"],
        "workdir": workdir.group(1) if workdir else "",
        "copies": json.dumps(copies),
    }
