"""The job entrypoints as plain processes: exit status and message on a bad config, the demo
data upload that the laptop overlay's entrypoint (jobs/demo_job.py) runs first (bucket created,
files in place), and demo_job.py refusing a wrong flag before it uploads anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, **kwargs
    )


def test_pipeline_entrypoint_exits_2_with_the_reason_on_a_bad_config(tmp_path):
    config = tmp_path / "my-run.yaml"
    config.write_text("run_dir: s3://bucket/runs/r1\nembed:\n  input: s3://bucket/i/\n  nmae: x\n")
    proc = _run(["jobs/pipeline.py", "--config", str(config)], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "unknown config key(s) embed.nmae" in proc.stderr


def test_pipeline_entrypoint_is_semclust_run():
    proc = _run(["jobs/pipeline.py", "--help"], timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: semclust run")


def test_demo_data_creates_the_bucket_and_uploads_the_demo_set(s3_server):
    client = s3_server.client()
    bucket = "t-demo-data-upload"  # does not exist yet: the entrypoint creates it
    proc = _run(
        ["jobs/demo_data.py", "--to", f"s3://{bucket}/images/", "--per-class", "1"], timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    objects = client.list_objects_v2(Bucket=bucket)["Contents"]
    keys = sorted(o["Key"] for o in objects if not o["Key"].endswith("/"))  # not folder markers
    # 12 classes x 1 photo, 3 unusable files and a README, as `semclust demo` builds them.
    assert len(keys) == 16, keys
    assert "images/_unusable/truncated.jpg" in keys and "images/README.txt" in keys
    assert sum(k.startswith("images/coffee/") for k in keys) == 1
    assert f"uploaded 16 demo files to s3://{bucket}/images/" in proc.stdout


def test_demo_job_refuses_a_wrong_run_flag_before_it_uploads(s3_server):
    """jobs/demo_job.py (the kind overlay's entrypoint) checks `semclust run`'s arguments first:
    a typo costs no upload."""
    bucket = "t-demo-job-bad-flag"
    proc = _run(
        ["jobs/demo_job.py", "--demo-to", f"s3://{bucket}/images/", "--confg", "run.yaml"],
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "unrecognized arguments: --confg" in proc.stderr
    assert bucket not in {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}
