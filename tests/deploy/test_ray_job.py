"""`jobs/pipeline.py` submitted to a real Ray head on 127.0.0.1, reading images from and writing
the run to the local S3 server, as `ray job submit` does it against a cluster; and each RayJob's
entrypoint, taken from the rendered manifests, submitted the way KubeRay's submitter pod does it.

The head gets the S3 credentials in its environment (as pods get them from a Secret); the
endpoint and region reach the job through its runtime_env, so a job that did not carry them
could not reach the store.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from semclust import storage
from tests.deploy.manifests import (
    Doc,
    dockerfile_facts,
    entrypoint_command,
    kustomizations,
    kustomize,
    label,
)
from tests.deploy.rayhead import LocalRayHead, ray_cli, start_ray_head

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
N_LISTED, N_EMBEDDED, N_FAILED = 75, 72, 3  # the demo_images fixture: 12 x 6 photos + 3 unusable


@pytest.fixture(scope="module")
def ray_head(s3_server):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", TF_CPP_MIN_LOG_LEVEL="2")
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        env.pop(name, None)  # these must come with the job
    env.pop("RAY_ADDRESS", None)
    head = start_ray_head(env)
    yield head
    head.stop()
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def _job_env() -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"],
        "AWS_REGION": os.environ["AWS_REGION"],
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


@pytest.fixture(scope="module")
def images_bucket(s3_server, demo_images) -> str:
    client = s3_server.client()
    bucket = "t-deploy-job"
    client.create_bucket(Bucket=bucket)
    for path in sorted(demo_images.rglob("*")):
        if path.is_file():
            key = f"images/{path.relative_to(demo_images)}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    return bucket


def _run_config(bucket: str, **extra) -> dict:
    cfg = {
        "run_dir": f"s3://{bucket}/runs/job",
        "embed": {
            "input": f"s3://{bucket}/images/",
            "backbone": "efficientnet_lite0",
            "weights": "default",
            "batch_size": 16,
            "rows_per_part": 25,
        },
        "cluster": {"k": 12, "niter": 10},
        "graph": {"k": 5},
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def submitted_run(ray_head: LocalRayHead, images_bucket, tmp_path_factory) -> dict:
    """The whole pipeline as one job, submitted with the Python job client from the repo root."""
    config = tmp_path_factory.mktemp("job") / "my-run.yaml"
    config.write_text(yaml.safe_dump(_run_config(images_bucket)))
    start = time.monotonic()
    job_id = ray_head.submit(
        entrypoint=f"python jobs/pipeline.py --config {config}",
        runtime_env={"working_dir": str(REPO), "env_vars": _job_env()},
    )
    status = ray_head.wait(job_id, timeout=900)
    seconds = time.monotonic() - start
    logs = ray_head.client().get_job_logs(job_id)
    print(f"\npipeline job {job_id}: {status} in {seconds:.1f} s wall time")
    return {"job_id": job_id, "status": status, "seconds": seconds, "logs": logs}


def test_pipeline_job_succeeds_and_writes_the_run_to_s3(submitted_run, images_bucket):
    assert submitted_run["status"] == "SUCCEEDED", submitted_run["logs"][-4000:]
    run_dir = f"s3://{images_bucket}/runs/job"
    info = storage.read_json(f"{run_dir}/run.json")
    assert set(info["stages"]) == {"embed", "cluster", "graph", "index", "report"}
    embed = info["stages"]["embed"]
    assert (embed["listed"], embed["embedded"], embed["failed"]) == (N_LISTED, N_EMBEDDED, N_FAILED)
    assert embed["processed_this_run"] == N_LISTED
    assert info["stages"]["cluster"]["k"] == 12
    assert info["config"]["embed"]["input"] == f"s3://{images_bucket}/images/"
    assert len(storage.list_shards(f"{run_dir}/embeddings")) == 3  # 75 rows, 25 per part
    assert len(storage.list_shards(f"{run_dir}/assignments")) == 3
    assert storage.read_json(f"{run_dir}/index/meta.json")["count"] == N_EMBEDDED
    # The job's own logs carry the stage summary the CLI prints.
    assert f"run directory: {run_dir}" in submitted_run["logs"]
    assert "listed 75, embedded 72, failed 3" in submitted_run["logs"]


def test_bad_config_fails_the_job_with_the_error_in_its_logs(ray_head, images_bucket, tmp_path):
    config = tmp_path / "bad.yaml"
    bad = _run_config(images_bucket, run_dir=f"s3://{images_bucket}/runs/bad")
    bad["embed"]["backbone"] = "vgg"
    config.write_text(yaml.safe_dump(bad))
    job_id = ray_head.submit(
        entrypoint=f"python jobs/pipeline.py --config {config}",
        runtime_env={"working_dir": str(REPO), "env_vars": _job_env()},
    )
    assert ray_head.wait(job_id, timeout=300) == "FAILED"
    client = ray_head.client()
    logs = client.get_job_logs(job_id)
    assert "embed.backbone='vgg' is not allowed" in logs
    assert "exit code 2" in (client.get_job_info(job_id).message or "")
    assert not storage.exists(f"s3://{images_bucket}/runs/bad")


def test_ray_job_submit_cli_resubmission_resumes_the_run(
    ray_head, images_bucket, submitted_run, tmp_path
):
    """`ray job submit --working-dir . -- python jobs/pipeline.py --config my-run.yaml`, the
    command a platform engineer types, on the run the first job finished: nothing is embedded
    again (as after a KubeRay retry), the later stages run again, the CLI exits 0."""
    assert submitted_run["status"] == "SUCCEEDED"
    workdir = tmp_path / "project"
    shutil.copytree(REPO / "jobs", workdir / "jobs")
    (workdir / "my-run.yaml").write_text(yaml.safe_dump(_run_config(images_bucket)))
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [
            ray_cli(),
            "job",
            "submit",
            "--address",
            ray_head.dashboard_url,
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps({"env_vars": _job_env()}),
            "--",
            "python",
            "jobs/pipeline.py",
            "--config",
            "my-run.yaml",
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower()
    assert "already committed, 0 to do" in out
    embed = storage.read_json(f"s3://{images_bucket}/runs/job/run.json")["stages"]["embed"]
    assert embed["processed_this_run"] == 0 and embed["embedded"] == N_EMBEDDED


# --- RayJob entrypoints as KubeRay's submitter pod runs them ----------------------------------


def _submitter_line(address: str, job_id: str, entrypoint: str, runtime_env: dict) -> str:
    """The shell line of KubeRay v1.7's submitter Job in K8sJobMode
    (ray-operator/controllers/ray/common/job.go, BuildJobSubmitCommand): words joined with
    spaces, the entrypoint pasted in unquoted, run as `/bin/bash -ce -- LINE`. Left out: the loop
    before it that waits for the dashboard (this head is up). The runtime env stands for the
    pods' environment (AWS_ENDPOINT_URL, AWS_REGION): this head has none, and KubeRay passes a
    RayJob's runtimeEnvYAML in the same place, quoted the same way (Go's strconv.Quote)."""
    status = ["ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1"]
    submit = ["ray", "job", "submit", "--address", address, "--no-wait"]
    submit += ["--runtime-env-json", json.dumps(json.dumps(runtime_env, separators=(",", ":")))]
    submit += ["--submission-id", job_id, "--", entrypoint.strip(), ";"]
    follow = ["ray", "job", "logs", "--address", address, "--follow", job_id]
    return " ".join(["if", "!", *status, ";", "then", *submit, "fi", ";", *follow])


def _image_paths(tmp: Path, docs: list[Doc], job: Doc, mounted: dict[str, str]) -> Path:
    """A stand-in for the image's file system under ``tmp``: the Dockerfile's WORKDIR is this
    checkout (a link), and each ConfigMap mounted into the head pod is a folder of its files
    (``mounted`` replaces a file's contents, keyed by its path in the pod). Returns the root."""
    root = tmp / "image"
    workdir = root / dockerfile_facts()["workdir"].lstrip("/")
    workdir.parent.mkdir(parents=True)
    workdir.symlink_to(REPO, target_is_directory=True)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    volumes = {v["name"]: v for v in head["spec"].get("volumes", [])}
    for mount in head["spec"]["containers"][0].get("volumeMounts", []):
        config_map = volumes[mount["name"]].get("configMap")
        if config_map is None:
            continue
        data = next(
            d["data"]
            for d in docs
            if d["kind"] == "ConfigMap" and d["metadata"]["name"] == config_map["name"]
        )
        folder = root / mount["mountPath"].lstrip("/")
        folder.mkdir(parents=True)
        for key, text in data.items():
            (folder / key).write_text(mounted.get(f"{mount['mountPath'].rstrip('/')}/{key}", text))
    return root


def _local_entrypoint(entrypoint: str, root: Path, smaller: dict[str, str]) -> str:
    """The entrypoint with each image path under ``root`` and the values of the flags in
    ``smaller`` replaced (a demo size): the same words, so the same shell structure."""
    words = entrypoint_command(entrypoint)
    out = []
    for i, word in enumerate(words):
        if i and words[i - 1] in smaller:
            word = smaller[words[i - 1]]
        elif word.startswith("/"):
            assert (root / word.lstrip("/")).exists(), f"{word} is not in the image or a mount"
            word = f"{root}{word}"
        out.append(word)
    return " ".join(out)


def _python_trap(folder: Path, log: Path) -> Path:
    """`python` / `python3` for the submitter's shell that record their arguments and fail: the
    submitter's own tools (`ray`, an absolute-path script) do not go through PATH's python."""
    folder.mkdir()
    for name in ("python", "python3", Path(sys.executable).name):
        trap = folder / name
        trap.write_text(f'#!/bin/sh\necho "$0 $*" >> "{log}"\nexit 97\n')
        trap.chmod(0o755)
    return folder


def _as_the_submitter(
    head: LocalRayHead, job_name: str, entrypoint: str, tmp: Path, timeout: float = 900
) -> dict:
    """Run the submitter's line for ``entrypoint`` with bash; returns what it did and what Ray
    recorded."""
    job_id = f"{job_name}-{secrets.token_hex(3)[:5]}"
    ran_here = tmp / "submitter-python.log"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = os.pathsep.join(
        [str(_python_trap(tmp / "trap", ran_here)), str(Path(ray_cli()).parent), env["PATH"]]
    )
    line = _submitter_line(head.dashboard_url, job_id, entrypoint, {"env_vars": _job_env()})
    start = time.monotonic()
    proc = subprocess.run(
        ["/bin/bash", "-ce", "--", line], env=env, capture_output=True, text=True, timeout=timeout
    )
    status = head.wait(job_id, timeout=timeout)  # the Ray job outlives a failed submitter
    client = head.client()
    return {
        "job_id": job_id,
        "returncode": proc.returncode,
        "output": proc.stdout + proc.stderr,
        "ran_in_submitter": ran_here.read_text() if ran_here.exists() else "",
        "status": status,
        "recorded_entrypoint": client.get_job_info(job_id).entrypoint,
        "logs": client.get_job_logs(job_id),
        "seconds": time.monotonic() - start,
    }


def _kind_expectations(_images_bucket: str) -> dict:
    return {
        "config": None,  # the overlay's own run config: the demo bucket in the store
        "smaller": {"--demo-per-class": "3"},  # 12 classes x 3 images, not x 20
        "status": "SUCCEEDED",
        "logs": [
            "uploaded 40 demo files to s3://semclust-demo/images/",  # 36 + 3 unusable + README
            "run directory: s3://semclust-demo/runs/demo",
            "listed 39, embedded 36, failed 3",
        ],
        "run_dir": "s3://semclust-demo/runs/demo",
    }


def _base_expectations(images_bucket: str) -> dict:
    # The base's own config needs GPUs and a bucket of its own. Its entrypoint is one command,
    # `semclust run`, whose whole run the kind overlay's job and the first test here show; a
    # config the CLI refuses shows in a few seconds that this command ran as the Ray job.
    bad = _run_config(images_bucket, run_dir=f"s3://{images_bucket}/runs/base-entrypoint")
    bad["embed"]["backbone"] = "vgg"
    return {
        "config": yaml.safe_dump(bad),
        "smaller": {},
        "status": "FAILED",
        "logs": ["embed.backbone='vgg' is not allowed"],
        "run_dir": None,
    }


EXPECTATIONS = {"base": _base_expectations, "overlays/kind": _kind_expectations}


@pytest.mark.parametrize("directory", kustomizations(), ids=label)
def test_each_rayjob_entrypoint_runs_whole_as_the_ray_job_from_the_submitters_shell(
    directory, ray_head, images_bucket, tmp_path
):
    """The entrypoint of every RayJob of the rendered manifests, pasted into KubeRay's submitter
    line and run with `bash -ce`: Ray records the whole entrypoint as the job, every step of it
    shows in the job's logs and its run directory, and no python ran in the submitter's shell
    (where `A && B` runs B)."""
    docs = kustomize(directory)
    jobs = [d for d in docs if d["kind"] == "RayJob"]
    assert jobs, label(directory)
    expect = EXPECTATIONS[label(directory)](images_bucket)  # a new overlay needs its entry here
    for job in jobs:
        words = entrypoint_command(job["spec"]["entrypoint"])
        config = words[words.index("--config") + 1]  # a file mounted from the ConfigMap
        mounted = {config: expect["config"]} if expect["config"] else {}
        root = _image_paths(tmp_path, docs, job, mounted)
        entrypoint = _local_entrypoint(job["spec"]["entrypoint"], root, expect["smaller"])
        done = _as_the_submitter(ray_head, job["metadata"]["name"], entrypoint, tmp_path)
        print(
            f"\n{label(directory)} entrypoint as the submitter: {done['status']} in "
            f"{done['seconds']:.1f} s"
        )
        assert done["ran_in_submitter"] == "", done["ran_in_submitter"]
        assert done["recorded_entrypoint"] == entrypoint  # all of it, word for word
        assert done["status"] == expect["status"], done["logs"][-4000:]
        for text in expect["logs"]:
            assert text in done["logs"], (text, done["logs"][-4000:])
        assert "submitted successfully" in done["output"], done["output"][-4000:]
        if expect["run_dir"]:
            assert done["returncode"] == 0, done["output"][-4000:]
            info = storage.read_json(f"{expect['run_dir']}/run.json")
            assert set(info["stages"]) == {"embed", "cluster", "graph", "index", "report"}


def test_the_submitters_line_runs_what_follows_a_double_ampersand_outside_the_job(
    ray_head, tmp_path
):
    """The bug the manifests avoid (kuberay#3802, #3929), shown by the same harness: with
    `A && B` Ray's job is A alone and B runs in the submitter's shell."""
    first = f"python {REPO}/jobs/pipeline.py --help"
    second = f"python {REPO}/jobs/pipeline.py --version"
    done = _as_the_submitter(ray_head, "two-commands", f"{first} && {second}", tmp_path, 300)
    assert done["recorded_entrypoint"] == first
    assert done["status"] == "SUCCEEDED" and "usage: semclust run" in done["logs"]
    assert done["ran_in_submitter"].split()[1:] == second.split()[1:]
    assert done["returncode"] == 97  # the trap's exit status ends `bash -ce`
