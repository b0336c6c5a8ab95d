"""`jobs/pipeline.py` submitted to a real Ray head on 127.0.0.1, reading images from and writing
the run to the local S3 server, as `ray job submit` does it against a cluster.

The head gets the S3 credentials in its environment (as pods get them from a Secret); the
endpoint and region reach the job through its runtime_env, so a job that did not carry them
could not reach the store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from semclust import storage
from tests.deploy.rayhead import LocalRayHead, ray_cli, start_ray_head

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
N_LISTED, N_EMBEDDED, N_FAILED = 75, 72, 3  # the demo_images fixture: 12 x 6 photos + 3 unusable


@pytest.fixture(autouse=True)
def _env_s3_options():
    storage.configure_s3(storage.s3_options_from_env())


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
