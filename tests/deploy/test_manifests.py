"""The deployment files, checked offline: they parse, every kustomization renders with the real
`kubectl kustomize`, core Kubernetes objects match the Kubernetes schemas, the RayJob / RayCluster
match the project's KubeRay schema, the laptop overlay renders to a valid CPU-only job, every
entrypoint is one command that exists and parses with the CLI's own parser, no two Ray objects
share a head Service, GPU pods and only they run the GPU image, versions agree, and no file holds
a credential."""

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
    BASE,
    CLUSTER,
    K8S_VERSION,
    KUBE,
    REPO,
    Doc,
    dockerfile_facts,
    entrypoint_command,
    head_service_names,
    kuberay_errors,
    kustomizations,
    kustomize,
    label,
    load_docs,
    manifest_files,
    pod_templates,
    ray_cluster_spec,
    unsafe_words,
)

KIND = KUBE / "overlays" / "kind"
DEPLOY_FILES = sorted(
    p
    for folder in (KUBE, CLUSTER, REPO / "jobs")
    for p in folder.rglob("*")
    if p.is_file() and (p.suffix in (".yaml", ".py", ".md") or p.name == "Dockerfile")
)
# What a user can apply: each file of kubernetes/base/ (`kubectl apply -f`) and each
# kustomization (`kubectl apply -k`). Listed without rendering, so that collection needs no
# kubectl; the tests render.
SOURCES = [f"file:{p.relative_to(KUBE).as_posix()}" for p in manifest_files()] + [
    f"kustomize:{label(d)}" for d in kustomizations()
]


def _source_docs(source: str) -> list[Doc]:
    how, _, rel = source.partition(":")
    return load_docs(KUBE / rel) if how == "file" else kustomize(KUBE / rel)


def _objects(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def _base_docs() -> list[Doc]:
    return [d for p in manifest_files() for d in load_docs(p)]


def _ray_objects() -> list[tuple[str, Doc]]:
    """(where, object) of every RayJob / RayCluster of every source."""
    return [
        (f"{source}:{d['kind']}/{d['metadata']['name']}", d)
        for source in SOURCES
        for d in _source_docs(source)
        if d["apiVersion"].startswith("ray.io/")
    ]


def _container(template: Doc) -> Doc:
    return template["spec"]["containers"][0]


def test_the_layout_has_a_base_and_its_overlays_beside_it():
    assert {label(d) for d in kustomizations()} == {"base", "overlays/kind"}
    assert {p.name for p in manifest_files()} == {"rayjob.yaml", "raycluster.yaml"}
    for directory in kustomizations():
        # kustomize refuses a base whose folder holds its overlay ("cycle detected").
        others = [d for d in kustomizations() if d != directory]
        assert not any(directory in d.parents for d in others), label(directory)


def test_every_yaml_file_parses():
    files = sorted(
        [*KUBE.rglob("*.yaml"), *CLUSTER.rglob("*.yaml"), *(REPO / "jobs").glob("*.yaml")]
    )
    assert len(files) >= 9
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} holds no YAML document"


@pytest.mark.parametrize("directory", kustomizations(), ids=label)
def test_every_kustomization_renders_with_kubectl_kustomize(directory):
    docs = kustomize(directory)  # AssertionError with kubectl's message if it refuses
    assert docs and all("apiVersion" in d and "kind" in d for d in docs), label(directory)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(set(names)) == len(names), names


def test_the_base_kustomization_is_the_rayjob_file():
    """`kubectl apply -k kubernetes/base` and `kubectl apply -f kubernetes/base/rayjob.yaml` apply
    the same objects, as the READMEs say."""

    def key(d: Doc) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    assert sorted(kustomize(BASE), key=key) == sorted(load_docs(BASE / "rayjob.yaml"), key=key)


def test_core_objects_validate_against_the_kubernetes_schemas():
    import kubernetes_validate

    docs = [d for source in SOURCES for d in _source_docs(source)]
    core = [d for d in docs if not d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in core} >= {"ConfigMap", "Deployment", "Service"}
    for doc in core:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # ... and the validator does refuse a broken object.
    broken = copy.deepcopy(_objects(core, "Deployment")[0])
    broken["spec"]["template"]["spec"]["containers"][0]["port"] = 8333  # not a field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.parametrize("source", SOURCES)
def test_ray_objects_validate_against_the_kuberay_schema(source):
    ray_objects = [d for d in _source_docs(source) if d["apiVersion"].startswith("ray.io/")]
    assert ray_objects, source
    for doc in ray_objects:
        where = f"{source}:{doc['kind']}"
        assert kuberay_errors(doc) == [], where
        for group in ray_cluster_spec(doc).get("workerGroupSpecs", []):
            lo, hi = group["minReplicas"], group["maxReplicas"]
            assert lo <= hi, f"{where} {group['groupName']}: minReplicas > maxReplicas"
            assert lo <= group.get("replicas", lo) <= hi, f"{where} {group['groupName']}: replicas"


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
    job = copy.deepcopy(_objects(load_docs(BASE / "rayjob.yaml"), "RayJob")[0])
    change(job["spec"] if where == "spec" else job["spec"]["rayClusterSpec"])
    errors = kuberay_errors(job)
    assert any(complaint in e for e in errors), errors


def test_rayjob_finishes_cleans_up_and_retries():
    job = _objects(load_docs(BASE / "rayjob.yaml"), "RayJob")[0]["spec"]
    assert job["entrypoint"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] > 0
    assert 0 < job["activeDeadlineSeconds"] <= 7 * 86400
    assert job["backoffLimit"] >= 1  # retries resume the run directory
    config = yaml.safe_load(
        _objects(load_docs(BASE / "rayjob.yaml"), "ConfigMap")[0]["data"]["run.yaml"]
    )
    assert config.get("mode", "resume") == "resume"


def test_the_deadline_comment_says_what_kuberay_does():
    """KubeRay v1.7 restarts the activeDeadlineSeconds clock (Status.StartTime) for each retry
    and does not retry an attempt that passed it: the comment must not say 'retries included'."""
    text = (BASE / "rayjob.yaml").read_text()
    comment = text[: text.index("activeDeadlineSeconds:")].rsplit("\n  entrypoint", 1)[1]
    assert "retries included" not in text
    assert "per attempt" in comment and "not retried" in comment, comment


def _service_clashes(objects: list[Doc]) -> list[str]:
    """Head Services (and declared Services) that two different objects would both claim."""
    claims: list[tuple[str, str]] = []  # (object, service name or pattern)
    for doc in objects:
        who = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Service":
            claims.append((who, re.escape(doc["metadata"]["name"])))
        else:
            claims += [
                (who, name if "[" in name else re.escape(name)) for name in head_service_names(doc)
            ]
    clashes = []
    for i, (who, pattern) in enumerate(claims):
        for other, other_pattern in claims[i + 1 :]:
            if who == other:
                continue
            literal = pattern.replace("\\", "")
            other_literal = other_pattern.replace("\\", "")
            if re.fullmatch(pattern, other_literal) or re.fullmatch(other_pattern, literal):
                clashes.append(f"{who} and {other}: {literal} / {other_literal}")
    return clashes


def test_no_two_ray_objects_create_the_same_head_service():
    """KubeRay names the head Service `<name>-head-svc` and a RayJob takes over an existing one:
    the RayJob and the RayCluster (and any Service of the manifests) must not share it, or a
    port-forward to the long-lived cluster reaches a job's cluster. An object and its overlay's
    version are one object (same kind and name): one of them is applied, not both."""
    objects: dict[tuple[str, str], Doc] = {}
    for source in SOURCES:
        for doc in _source_docs(source):
            if doc["apiVersion"].startswith("ray.io/") or doc["kind"] == "Service":
                objects.setdefault((doc["kind"], doc["metadata"]["name"]), doc)
    kinds = {kind for kind, _ in objects}
    assert {"RayJob", "RayCluster", "Service"} <= kinds, kinds
    assert _service_clashes(list(objects.values())) == []
    names = {key: head_service_names(doc)[0] for key, doc in objects.items() if key[0] != "Service"}
    assert names == {
        ("RayJob", "semclust-job"): "semclust-job-head-svc",
        ("RayCluster", "semclust-cluster"): "semclust-cluster-head-svc",
    }
    # The check does catch the clash the manifests had (both objects named `semclust`), and a
    # RayCluster named like a RayJob's own cluster.
    job = copy.deepcopy(objects["RayJob", "semclust-job"])
    cluster = copy.deepcopy(objects["RayCluster", "semclust-cluster"])
    job["metadata"]["name"] = cluster["metadata"]["name"] = "semclust"
    assert _service_clashes([job, cluster])
    cluster["metadata"]["name"] = "semclust-ab1c2"
    assert _service_clashes([job, cluster])


def test_the_readmes_port_forward_to_the_rayclusters_service():
    cluster = _objects(load_docs(BASE / "raycluster.yaml"), "RayCluster")[0]
    service = head_service_names(cluster)[0]
    for path in (REPO / "README.md", KUBE / "README.md", BASE / "raycluster.yaml"):
        forwards = re.findall(r"port-forward service/(\S+)", path.read_text())
        assert forwards and set(forwards) == {service}, (path, forwards)


def test_ray_version_is_pinned_and_agrees_everywhere():
    import ray

    facts = dockerfile_facts()
    version = facts["ray_version"]
    assert version == ray.__version__  # the Ray the tests (and the job tests) run
    assert facts["base_image"].startswith(f"rayproject/ray:{version}-")
    for where, doc in _ray_objects():
        assert ray_cluster_spec(doc)["rayVersion"] == version, where
    images = re.findall(
        r"rayproject/ray(?:-ml)?:(\S+)",
        "\n".join(p.read_text() for p in [*KUBE.rglob("*.yaml"), *CLUSTER.glob("*.yaml")]),
    )
    assert images and all(tag.startswith(f"{version}-") for tag in images), images
    for path in CLUSTER.glob("*.yaml"):
        assert f'"ray[data,default]=={version}"' in path.read_text(), path


def test_gpu_workers_request_gpus_and_tolerate_the_gpu_taint():
    for path in manifest_files():
        for doc in load_docs(path):
            if not doc["apiVersion"].startswith("ray.io/"):
                continue
            where = f"{path.name}:{doc['kind']}"
            spec = ray_cluster_spec(doc)
            head = _container(spec["headGroupSpec"]["template"])
            assert "nvidia.com/gpu" not in json.dumps(head["resources"]), where
            gpu_groups = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
            assert len(gpu_groups) == 1, where
            group = gpu_groups[0]
            resources = _container(group["template"])["resources"]
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, where
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in group[
                "template"
            ]["spec"]["tolerations"], where
            assert group["maxReplicas"] >= 1


def _gpus(template: Doc) -> int:
    """GPUs a pod template asks for (requests or limits of any container)."""
    return max(
        [
            int(c.get("resources", {}).get(part, {}).get("nvidia.com/gpu", 0))
            for c in template["spec"]["containers"]
            for part in ("requests", "limits")
        ]
        or [0]
    )


def _image_rule(where: str, image: str, gpu: bool) -> str | None:
    """None if ``image`` fits the hardware, else the complaint. GPU: a `-gpu` tag. No GPU: not
    a `-gpu` tag, and the project's own image in its `-cpu` variant (Ray's images may have no
    suffix, as the submitter's `rayproject/ray:2.60.0-py311`)."""
    tag = image.rsplit(":", 1)[-1]
    if gpu:
        return None if tag.endswith("-gpu") else f"{where} has a GPU but runs {image}"
    if tag.endswith("-gpu") or "gpu" in tag.split("-"):
        return f"{where} has no GPU but runs the GPU image {image}"
    if "semclust" in image and not tag.endswith("-cpu"):
        return f"{where} has no GPU but runs {image}, not the CPU variant"
    return None


def test_pods_with_a_gpu_run_the_gpu_image_and_all_others_a_cpu_image():
    checked = {"gpu": 0, "cpu": 0}
    problems = []
    for where, doc in _ray_objects():
        for part, template in pod_templates(doc):
            gpu = _gpus(template) > 0
            checked["gpu" if gpu else "cpu"] += 1
            for container in template["spec"]["containers"]:
                problems.append(_image_rule(f"{where} {part}", container["image"], gpu))
    assert [p for p in problems if p] == []
    assert checked["gpu"] >= 2 and checked["cpu"] >= 5, checked  # the rule did meet both kinds
    # The CPU worker group of the long-lived cluster, which ran the GPU image before.
    cluster = _objects(load_docs(BASE / "raycluster.yaml"), "RayCluster")[0]
    cpu_group = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "cpu")
    assert _container(cpu_group["template"])["image"].endswith("-cpu")
    # ... and the rule refuses what it is for.
    assert _image_rule("x", "registry.example.com/semclust:0.1.0-ray2.60.0-gpu", gpu=False)
    assert _image_rule("x", "registry.example.com/semclust:0.1.0-ray2.60.0-cpu", gpu=True)
    assert _image_rule("x", "registry.example.com/semclust:0.1.0", gpu=False)


def test_kind_overlay_is_cpu_only_with_the_local_image_and_an_in_cluster_s3():
    docs = kustomize(KIND)
    assert {d["kind"] for d in docs} == {"ConfigMap", "RayJob", "Deployment", "Service"}
    job = _objects(docs, "RayJob")[0]
    assert job["metadata"]["name"] == "semclust-job"  # the base's RayJob, patched
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
    def check(where: str, container: Doc) -> None:
        env = {e["name"]: e for e in container.get("env", [])}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[name], f"{where}: {name} written in the manifest"
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == ("semclust-s3", name), where

    for where, doc in _ray_objects():
        for part, template in pod_templates(doc):
            if part != "submitter":  # it only talks to the Ray head
                check(f"{where} {part}", _container(template))
    for deployment in _objects(kustomize(KIND), "Deployment"):
        check("seaweedfs", _container(deployment["spec"]["template"]))
    assert not any(d["kind"] == "Secret" for source in SOURCES for d in _source_docs(source))


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


def _load_job_module(path: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(path.parent))  # as `python jobs/x.py` has it: sibling imports
    spec = importlib.util.spec_from_file_location(f"jobs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unsafe_words_are_what_the_submitters_shell_would_change():
    assert unsafe_words("python /a/jobs/pipeline.py --config /c/run.yaml --k 12") == []
    assert unsafe_words("python a.py --x 1 && python b.py") == ["&&"]
    assert unsafe_words("python a.py; python b.py") == ["a.py;"]
    assert unsafe_words("python a.py | tee log") == ["|"]
    assert unsafe_words("python a.py --name 'a b'") == ["'a", "b'"]
    assert unsafe_words("python a.py --to $BUCKET > out") == ["$BUCKET", ">"]
    with pytest.raises(AssertionError, match="submitter's shell"):
        entrypoint_command("python a.py && python b.py")


@pytest.mark.parametrize("directory", kustomizations(), ids=label)
def test_entrypoints_are_one_command_that_exists_and_parses(directory, tmp_path, monkeypatch):
    docs = kustomize(directory)
    jobs = _objects(docs, "RayJob")
    if not jobs:
        pytest.skip(f"{label(directory)} has no RayJob")
    for job in jobs:
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
        command = entrypoint_command(job["spec"]["entrypoint"])  # one command, nothing unsafe
        assert command[0] == "python", command
        script = _script_path(command[1])
        assert script.is_file(), script
        run_args = command[2:]
        if script.name == "demo_job.py":
            demo, run_args = (
                _load_job_module(script, monkeypatch).build_parser().parse_known_args(run_args)
            )
            assert demo.demo_to.startswith("s3://") and demo.demo_per_class >= 1
        else:
            assert script.name == "pipeline.py", f"no check for the entrypoint {script.name}"
        parsed = build_parser().parse_args(["run", *run_args])  # SystemExit on a bad flag
        parsed.config = str(_mounted_file(docs, head, parsed.config, tmp_path))
        cfg = config_from_args(parsed)
        assert cfg.run_dir.startswith("s3://") and cfg.embed.input.startswith("s3://")
        if script.name == "demo_job.py":  # the run reads what step one uploads
            assert cfg.embed.input.rstrip("/") == demo.demo_to.rstrip("/")


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


def _launcher_images(config: Doc) -> dict[str, str]:
    """Node type -> the image `ray up` runs on it: the node type's `docker` over the global one,
    then `head_image` / `worker_image`, then `image` (ray.autoscaler's own precedence)."""
    out = {}
    for name, node in config["available_node_types"].items():
        docker = dict(config.get("docker", {}), **node.get("docker", {}))
        which = "head_image" if name == config["head_node_type"] else "worker_image"
        out[name] = docker.get(which, docker["image"])
    return out


def _launcher_gpus(node: Doc) -> bool:
    """Whether a node type has a GPU: Ray resources, GCP accelerators, or an AWS GPU family."""
    if node.get("resources", {}).get("GPU", 0) > 0:
        return True
    config = node["node_config"]
    if config.get("guestAccelerators"):
        return True
    return bool(re.match(r"(g|p)\d", config.get("InstanceType", "")))


def test_launcher_node_types_run_the_image_of_their_hardware():
    seen = set()
    for path in sorted(CLUSTER.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        images = _launcher_images(config)
        for name, node in config["available_node_types"].items():
            gpu = _launcher_gpus(node)
            seen.add(gpu)
            problem = _image_rule(f"{path.name} {name}", images[name], gpu)
            assert problem is None, problem
            if not gpu:
                assert images[name].endswith("-cpu"), (path.name, name, images[name])
    assert seen == {True, False}


def test_gcp_gpu_nodes_schedule_with_one_mapping_that_terminates_on_maintenance():
    """The Compute API's `scheduling` is one object; Ray's GCP examples write a list of one-key
    mappings (ray-project/ray#46248). VMs with GPUs cannot live-migrate: TERMINATE."""
    config = yaml.safe_load((CLUSTER / "gcp-gpu.yaml").read_text())
    gpu_nodes = 0
    for name, node in config["available_node_types"].items():
        node_config = node["node_config"]
        scheduling = node_config.get("scheduling")
        if scheduling is not None:
            assert isinstance(scheduling, dict), f"{name}: scheduling is {type(scheduling)}"
            assert scheduling.get("onHostMaintenance", "MIGRATE") in ("MIGRATE", "TERMINATE")
            for key in ("preemptible", "automaticRestart"):
                assert isinstance(scheduling.get(key, False), bool), (name, key)
            if scheduling.get("preemptible"):
                assert scheduling.get("automaticRestart") is False, name
        if node_config.get("guestAccelerators"):
            gpu_nodes += 1
            assert isinstance(scheduling, dict), f"{name} has GPUs and no scheduling mapping"
            assert scheduling["onHostMaintenance"] == "TERMINATE", name
    assert gpu_nodes >= 1


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


def test_kubectl_refuses_a_base_that_holds_its_overlay(tmp_path):
    """The old layout (kubernetes/kustomization.yaml with kubernetes/overlays/kind inside it),
    which a hand-written renderer accepted: the real kustomize refuses it."""
    old = tmp_path / "kubernetes"
    (old / "overlays" / "kind").mkdir(parents=True)
    (old / "rayjob.yaml").write_text((BASE / "rayjob.yaml").read_text())
    (old / "kustomization.yaml").write_text("resources:\n  - rayjob.yaml\n")
    (old / "overlays" / "kind" / "kustomization.yaml").write_text("resources:\n  - ../..\n")
    assert kustomize(old)  # the base alone renders
    with pytest.raises(AssertionError, match="cycle detected"):
        kustomize(old / "overlays" / "kind")
