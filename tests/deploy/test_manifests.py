"""The deployment files, checked offline: they parse, core Kubernetes objects match the
Kubernetes schemas, the RayJob / RayCluster match the project's KubeRay schema, the laptop overlay
renders to a valid CPU-only job, every entrypoint exists and parses with the CLI's own parser,
versions agree, and no file holds a credential."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from semclust.cli import build_parser, config_from_args
from tests.deploy.manifests import (
    CLUSTER,
    K8S_VERSION,
    KUBE,
    REPO,
    Doc,
    dockerfile_facts,
    entrypoint_commands,
    kuberay_errors,
    kustomize,
    load_docs,
    manifest_files,
    pod_templates,
    ray_cluster_spec,
)

KIND = KUBE / "overlays" / "kind"
DEPLOY_FILES = sorted(
    p
    for folder in (KUBE, CLUSTER, REPO / "jobs")
    for p in folder.rglob("*")
    if p.is_file() and (p.suffix in (".yaml", ".py", ".md") or p.name == "Dockerfile")
)


def _objects(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def _base_docs() -> list[Doc]:
    return [d for p in manifest_files() if KIND not in p.parents for d in load_docs(p)]


def _ray_objects() -> list[tuple[str, Doc]]:
    """(label, object) of every RayJob / RayCluster a user can apply."""
    out = [
        (f"{p.relative_to(REPO)}:{d['kind']}", d)
        for p in manifest_files()
        if KIND not in p.parents
        for d in load_docs(p)
        if d["apiVersion"].startswith("ray.io/")
    ]
    out += [
        (f"overlays/kind:{d['kind']}", d) for d in kustomize(KIND) if d["apiVersion"] == "ray.io/v1"
    ]
    return out


RAY_OBJECTS = _ray_objects()


def test_every_yaml_file_parses():
    files = sorted(
        [*KUBE.rglob("*.yaml"), *CLUSTER.rglob("*.yaml"), *(REPO / "jobs").glob("*.yaml")]
    )
    assert len(files) >= 9
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} holds no YAML document"


def test_core_objects_validate_against_the_kubernetes_schemas():
    import kubernetes_validate

    docs = _base_docs() + kustomize(KIND)
    core = [d for d in docs if not d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in core} >= {"ConfigMap", "Deployment", "Service"}
    for doc in core:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # ... and the validator does refuse a broken object.
    broken = copy.deepcopy(_objects(core, "Deployment")[0])
    broken["spec"]["template"]["spec"]["containers"][0]["port"] = 8333  # not a field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.parametrize("label,doc", RAY_OBJECTS, ids=[label for label, _ in RAY_OBJECTS])
def test_ray_objects_validate_against_the_kuberay_schema(label, doc):
    assert kuberay_errors(doc) == []
    for group in ray_cluster_spec(doc).get("workerGroupSpecs", []):
        lo, hi = group["minReplicas"], group["maxReplicas"]
        assert lo <= hi, f"{label} {group['groupName']}: minReplicas > maxReplicas"
        assert lo <= group.get("replicas", lo) <= hi, f"{label} {group['groupName']}: replicas"


@pytest.mark.parametrize(
    "where,change,complaint",
    [
        ("spec", lambda s: s.update(shutdownAfterJobFinish=True), "Additional properties"),
        ("spec", lambda s: s.update(shutdownAfterJobFinishes=False), "True was expected"),
        ("spec", lambda s: s.update(backoffLimit=-1), "less than the minimum"),
        ("spec", lambda s: s.update(activeDeadlineSeconds=0), "less than the minimum"),
        ("spec", lambda s: s.update(submissionMode="K8sJob"), "is not one of"),
        ("spec", lambda s: s.pop("rayClusterSpec"), "is a required property"),
        ("cluster", lambda c: c.update(rayVersion="latest"), "does not match"),
        (
            "cluster",
            lambda c: c["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
            "is not of type 'string'",
        ),
        (
            "cluster",
            lambda c: c["workerGroupSpecs"][0].pop("minReplicas"),
            "is a required property",
        ),
        (
            "cluster",
            lambda c: c["workerGroupSpecs"][0]["template"]["spec"].update(containers=[]),
            "should be non-empty",
        ),
        (
            "cluster",
            lambda c: c["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(
                resource={}
            ),
            "Additional properties",
        ),
        (
            "cluster",
            lambda c: c["workerGroupSpecs"][0]["template"]["spec"]["tolerations"][0].update(
                operator=1
            ),
            "is not of type 'string'",
        ),
    ],
    ids=[
        "misspelt-field",
        "ttl-without-shutdown",
        "negative-backoff",
        "zero-deadline",
        "unknown-submission-mode",
        "no-cluster",
        "unpinned-ray-version",
        "non-string-start-param",
        "no-min-replicas",
        "no-containers",
        "misspelt-container-field",
        "bad-toleration-type",
    ],
)
def test_the_kuberay_schema_refuses_what_kuberay_refuses(where, change, complaint):
    """A misspelt field, wrong types and values KubeRay's API or webhook refuses."""
    job = copy.deepcopy(_objects(load_docs(KUBE / "rayjob.yaml"), "RayJob")[0])
    change(job["spec"] if where == "spec" else job["spec"]["rayClusterSpec"])
    errors = kuberay_errors(job)
    assert any(complaint in e for e in errors), errors


def test_rayjob_finishes_cleans_up_and_retries():
    job = _objects(load_docs(KUBE / "rayjob.yaml"), "RayJob")[0]["spec"]
    assert job["entrypoint"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] > 0
    assert 0 < job["activeDeadlineSeconds"] <= 7 * 86400
    assert job["backoffLimit"] >= 1  # retries resume the run directory
    config = yaml.safe_load(
        _objects(load_docs(KUBE / "rayjob.yaml"), "ConfigMap")[0]["data"]["run.yaml"]
    )
    assert config.get("mode", "resume") == "resume"


def test_ray_version_is_pinned_and_agrees_everywhere():
    import ray

    facts = dockerfile_facts()
    version = facts["ray_version"]
    assert version == ray.__version__  # the Ray the tests (and the job tests) run
    assert facts["base_image"].startswith(f"rayproject/ray:{version}-")
    for label, doc in RAY_OBJECTS:
        assert ray_cluster_spec(doc)["rayVersion"] == version, label
    images = re.findall(
        r"rayproject/ray(?:-ml)?:(\S+)",
        "\n".join(p.read_text() for p in [*KUBE.rglob("*.yaml"), *CLUSTER.glob("*.yaml")]),
    )
    assert images and all(tag.startswith(f"{version}-") for tag in images), images
    for path in CLUSTER.glob("*.yaml"):
        assert f'"ray[data,default]=={version}"' in path.read_text(), path


def _container(template: Doc) -> Doc:
    return template["spec"]["containers"][0]


def test_gpu_workers_request_gpus_and_tolerate_the_gpu_taint():
    for label, doc in RAY_OBJECTS:
        if label.startswith("overlays/kind"):
            continue
        spec = ray_cluster_spec(doc)
        head = _container(spec["headGroupSpec"]["template"])
        assert "nvidia.com/gpu" not in json.dumps(head["resources"]), label
        gpu_groups = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
        assert len(gpu_groups) == 1, label
        group = gpu_groups[0]
        resources = _container(group["template"])["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, label
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in group[
            "template"
        ]["spec"]["tolerations"], label
        assert group["maxReplicas"] >= 1


def test_kind_overlay_is_cpu_only_with_the_local_image_and_an_in_cluster_s3():
    docs = kustomize(KIND)
    assert {d["kind"] for d in docs} == {"ConfigMap", "RayJob", "Deployment", "Service"}
    job = _objects(docs, "RayJob")[0]
    text = json.dumps(job)
    assert "nvidia.com/gpu" not in text and "tolerations" not in text
    service = _objects(docs, "Service")[0]
    endpoint = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    for where, template in pod_templates(job):
        container = _container(template)
        assert container["image"] == "semclust:0.1.0-ray2.60.0-cpu", where
        assert container["imagePullPolicy"] == "IfNotPresent", where
        if where != "submitter":
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["AWS_ENDPOINT_URL"] == endpoint, where
    config = yaml.safe_load(_objects(docs, "ConfigMap")[0]["data"]["run.yaml"])
    assert config["embed"]["device"] == "cpu" and config["embed"]["weights"] == "default"


def test_s3_credentials_come_from_a_secret():
    def check(label: str, container: Doc) -> None:
        env = {e["name"]: e for e in container.get("env", [])}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[name], f"{label}: {name} written in the manifest"
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == ("semclust-s3", name), label

    for label, doc in RAY_OBJECTS:
        for where, template in pod_templates(doc):
            if where != "submitter":  # it only talks to the Ray head
                check(f"{label} {where}", _container(template))
    for deployment in _objects(kustomize(KIND), "Deployment"):
        check("seaweedfs", _container(deployment["spec"]["template"]))
    assert not any(d["kind"] == "Secret" for d in _base_docs() + kustomize(KIND))


def _script_path(image_path: str) -> Path:
    """The repository file an image path refers to (the Dockerfile copies jobs/ under WORKDIR)."""
    facts = dockerfile_facts()
    workdir = facts["workdir"].rstrip("/") + "/"
    assert image_path.startswith(workdir), f"{image_path} is not under the image's {workdir}"
    rel = image_path[len(workdir) :]
    assert any(rel.startswith(dst.rstrip("/") + "/") for _, dst in json.loads(facts["copies"]))
    return REPO / rel


def _mounted_file(docs: list[Doc], template: Doc, path: str, tmp: Path) -> Path:
    """The ConfigMap key mounted at ``path`` in a pod template, written to a local file."""
    container = _container(template)
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
            name = volume["configMap"]["name"]
            data = next(
                d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name
            )
            out = tmp / Path(path).name
            out.write_text(data["data"][path[len(prefix) :]])
            return out
    raise AssertionError(f"{path} is not mounted into the head pod")


def _load_job_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"jobs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("source", ["base", "kind"])
def test_entrypoints_exist_and_their_arguments_parse(source, tmp_path):
    docs = _base_docs() if source == "base" else kustomize(KIND)
    job = _objects(docs, "RayJob")[0]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    commands = entrypoint_commands(job["spec"]["entrypoint"])
    assert commands[-1][1].endswith("/jobs/pipeline.py")
    for command in commands:
        assert command[0] == "python", command
        script = _script_path(command[1])
        assert script.is_file(), script
        args = command[2:]
        if script.name == "pipeline.py":
            parsed = build_parser().parse_args(["run", *args])  # SystemExit on a bad flag
            parsed.config = str(_mounted_file(docs, head, parsed.config, tmp_path))
            cfg = config_from_args(parsed)
            assert cfg.run_dir.startswith("s3://") and cfg.embed.input.startswith("s3://")
        else:
            parsed = _load_job_module(script).build_parser().parse_args(args)
            assert parsed.to.startswith("s3://")


_CREDENTIAL_PATTERNS = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(
        r"(?i)(?:secret_access_key|secret[-_]?key|password|passwd|token)\s*[:=]\s*"
        r"['\"]?(?!\$|\.\.\.|<|\{)[A-Za-z0-9/+=_\-]{8,}"
    ),
    re.compile(r"(?i)\b(?:stringData|data):\s*\n\s+\S+:\s+[A-Za-z0-9+/]{16,}={0,2}\s*$", re.M),
]


def test_no_deployment_file_holds_a_credential():
    from tests.s3server import ACCESS_KEY, SECRET_KEY

    assert len(DEPLOY_FILES) >= 12
    for path in DEPLOY_FILES:
        text = path.read_text()
        for pattern in _CREDENTIAL_PATTERNS:
            match = pattern.search(text)
            assert match is None, f"{path.relative_to(REPO)}: {match.group(0)[:40]!r}"
        assert ACCESS_KEY not in text and SECRET_KEY not in text, path
        for key in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
            assert not os.environ.get(key) or os.environ[key] not in text, path
    # The patterns do catch what they are for.
    assert _CREDENTIAL_PATTERNS[0].search("AKIAIOSFODNN7EXAMPLE")
    assert _CREDENTIAL_PATTERNS[2].search("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG")


def test_cluster_launcher_configs_validate_with_rays_own_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    providers = set()
    for path in sorted(CLUSTER.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        jsonschema.validate(config, schema)
        validate_config(prepare_config(copy.deepcopy(config)))  # defaults filled, as `ray up`
        providers.add(config["provider"]["type"])
        types = config["available_node_types"]
        head = types[config["head_node_type"]]
        assert head["resources"].get("CPU") == 0, path  # no tasks on the head
        gpu = [t for n, t in types.items() if "gpu" in n and n != config["head_node_type"]]
        assert gpu and all(t["max_workers"] >= 1 and "min_workers" in t for t in gpu), path
        assert config["docker"]["image"].endswith("-gpu"), path
        assert config["file_mounts"] == {"/home/ray/semclust": "."}, path
        assert any("/home/ray/semclust" in c for c in config["setup_commands"]), path
    assert providers == {"aws", "gcp"}


def test_runtime_env_file_is_valid_and_lists_the_package_dependencies():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    for module in env["py_modules"]:
        assert (REPO / module / "__init__.py").is_file(), module
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = {
        re.split(r"[\[<>=!~ ]", dep, maxsplit=1)[0].lower()
        for dep in pyproject["project"]["dependencies"]
    } - {"ray"}
    listed = {re.split(r"[\[<>=!~ ]", dep, maxsplit=1)[0].lower() for dep in env["pip"]["packages"]}
    assert listed == wanted
