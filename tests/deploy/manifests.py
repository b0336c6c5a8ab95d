"""Reading the deployment files the way their tools do: YAML documents, kustomizations rendered
by the real `kubectl kustomize`, and the schemas they are checked against."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "kubernetes"
BASE = KUBE / "base"
CLUSTER = REPO / "cluster"
SCHEMA = Path(__file__).with_name("schemas") / "kuberay-v1.7.0.schema.json"
K8S_VERSION = "1.33"  # Kubernetes schemas the core objects are checked against (KubeRay 1.7 era)

Doc = dict[str, Any]


def load_docs(path: Path) -> list[Doc]:
    """Every non-empty YAML document of a file."""
    return parse_docs(path.read_text())


def parse_docs(text: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def manifest_files() -> list[Path]:
    """The files a user applies with `kubectl apply -f`: Kubernetes objects in kubernetes/base/
    (the overlays' files are patches and extra resources, used only through kustomize)."""
    out = []
    for path in sorted(BASE.glob("*.yaml")):
        docs = load_docs(path)
        objects = all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs)
        if docs and objects and not any(d["kind"] == "Kustomization" for d in docs):
            out.append(path)
    return out


def kustomizations() -> list[Path]:
    """Every folder under kubernetes/ that `kubectl apply -k` can be pointed at."""
    return sorted(p.parent for p in KUBE.rglob("kustomization.yaml"))


def label(directory: Path) -> str:
    """A kustomization's name in messages and test ids: its folder under kubernetes/."""
    return directory.relative_to(KUBE).as_posix() if KUBE in directory.parents else str(directory)


def kubectl() -> str:
    """The kubectl to render with: the one on PATH, else one in this venv (a pip-installed
    kubectl wheel). Missing: a failure under CI or where tools/test.sh could install it (root
    with apt-get), a skip with the reason elsewhere."""
    venv_bin = str(Path(sys.executable).parent)
    found = shutil.which("kubectl") or shutil.which("kubectl", path=venv_bin)
    if found:
        return found
    message = (
        "kubectl is not installed: `kubectl kustomize` renders the kustomizations under "
        "kubernetes/; run `bash tools/test.sh`, which installs it"
    )
    can_install = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get")
    if os.environ.get("CI", "").lower() == "true" or can_install:
        pytest.fail(message, pytrace=False)
    pytest.skip(message + " (needs root and apt-get)")


@functools.cache
def _rendered(directory: Path) -> str:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, KUBECONFIG=os.devnull),  # rendering needs no cluster
    )
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {label(directory)} failed:\n{proc.stderr}")
    return proc.stdout


def kustomize(directory: Path) -> list[Doc]:
    """The objects `kubectl apply -k DIRECTORY` would apply, as the real kustomize renders them."""
    return copy.deepcopy(parse_docs(_rendered(directory.resolve())))


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


def unsafe_words(entrypoint: str) -> list[str]:
    """Words of an entrypoint that an unquoted paste into a shell line would change: operators
    (`&&`, `;`, `|`, redirections), quotes, expansions, globs, comments, ... Empty: bash splits
    the entrypoint into exactly its space-separated words, all of them go to `ray job submit`,
    and Ray's `shlex.join` of them gives back the entrypoint."""
    return [w for w in entrypoint.split() if shlex.quote(w) != w]


def entrypoint_command(entrypoint: str) -> list[str]:
    """The argv of a one-command entrypoint (see unsafe_words)."""
    bad = unsafe_words(entrypoint)
    assert not bad, f"entrypoint {entrypoint!r}: {bad} would not survive the submitter's shell"
    return entrypoint.split()


def head_service_names(doc: Doc) -> list[str]:
    """The head Services KubeRay (v1.7) creates for a RayJob or RayCluster: `<name>-head-svc`
    (a RayCluster may set its own with headGroupSpec.headService.metadata.name). A RayJob's own
    RayCluster, `<name>-<5 random characters>`, gets one too; it is given as a pattern."""
    name = doc["metadata"]["name"]
    if doc["kind"] == "RayCluster":
        custom = doc["spec"]["headGroupSpec"].get("headService", {}).get("metadata", {})
        return [custom.get("name") or f"{name}-head-svc"]
    assert doc["kind"] == "RayJob", doc["kind"]
    return [f"{name}-head-svc", f"{name}-[a-z0-9]{{5}}-head-svc"]


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
