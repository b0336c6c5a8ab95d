"""Faults caused for real under a running `semclust embed`: the S3 server stopped and restarted
(reads, then commits), a full disk, Ctrl-C, and a second run on the same run directory. None
may lose an image, write a healthy image as a failure, duplicate a row, or end in a traceback;
either the run completes, or it exits non-zero with one message and one resume completes it,
with embeddings equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from semclust import storage
from semclust.config import StorageConfig
from tests.faults import (
    UNUSABLE,
    actors_paused,
    check_complete,
    cli_message,
    committed_parts,
    embed_command,
    finish,
    model_actor_started,
    outage,
    read_outcome,
    reference_embeddings,
    start_and_wait,
    stop_group,
)
from tests.s3server import start_s3_server

pytestmark = pytest.mark.slow

OUTAGE_SECONDS = 10.0  # after the job first reaches the dead store


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The demo set at 12 images per class (144 good, 3 broken): long enough to stop mid-way."""
    from semclust.demo import build_demo_images

    root = tmp_path_factory.mktemp("fault-images")
    build_demo_images(root, per_class=12, seed=1)
    return root


@pytest.fixture(scope="module")
def reference(images) -> dict:
    return reference_embeddings(images)


@pytest.fixture(scope="module")
def store(tmp_path_factory, images):
    """A SeaweedFS of this module's own (it is stopped under running jobs), with the images."""
    server = start_s3_server(tmp_path_factory.mktemp("fault-s3"))
    client = server.client()
    client.create_bucket(Bucket="faults")
    for path in sorted(images.rglob("*")):
        if path.is_file():
            key = f"images/{path.relative_to(images)}"
            client.put_object(Bucket="faults", Key=key, Body=path.read_bytes())
    # This process's own reads (run.json, the shards) go to this server, not the session's.
    with storage.using(StorageConfig(endpoint_url=server.endpoint, region="us-east-1")):
        yield server
    server.stop()


def _env(store) -> dict[str, str]:
    return dict(os.environ, AWS_ENDPOINT_URL=store.endpoint)


def _no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]


def _last_line(stderr: str) -> str:
    message = cli_message(stderr)
    assert message, stderr[-3000:]
    return message


# Input and run directory both on the store: the outage meets reads and commits alike (an input
# on S3 with a local run directory is the reads half, which the past-budget test also covers).
@pytest.mark.parametrize("source,target", [("s3", "s3")])
def test_outage_is_ridden_out_by_the_retry_budget(
    store, images, reference, tmp_path, source, target
):
    """The S3 server killed once the model actor starts, its port resetting connections until
    the job has tried it and 10 s more, then the server back on the same ports and data: the
    default budget waits it out and the run completes at once."""
    prefix = "s3://faults/images"
    run_dir = str(tmp_path / "run") if target == "local" else "s3://faults/runs/ridden-out"
    cmd = embed_command(prefix + "/", run_dir)
    proc = start_and_wait(cmd, _env(store), model_actor_started)
    outage(store, proc, hold=OUTAGE_SECONDS, min_attempts=12)
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    assert "retrying for up to" in err  # the outage reached the job's reads or writes
    check_complete(read_outcome(run_dir), prefix, reference)
    embed = storage.read_json(storage.join(run_dir, "run.json"))["stages"]["embed"]
    assert (embed["status"], embed["listed"], embed["embedded"]) == ("done", 147, 144)


@pytest.mark.parametrize("source,target", [("s3", "local"), ("local", "s3")])
def test_outage_past_the_budget_fails_cleanly_and_one_resume_completes(
    store, images, reference, tmp_path, source, target
):
    """A 1 s retry budget and the store away until the job gives up. Input on S3, run dir
    local: the reads that failed are committed nowhere, the run ends with exit 1 and one
    message. Run dir on S3: the commits fail, and the same. Nothing healthy is a failure row;
    one resume completes the run."""
    prefix = "s3://faults/images" if source == "s3" else "file://" + str(images)
    run_dir = str(tmp_path / "run") if target == "local" else "s3://faults/runs/past-budget"
    cmd = embed_command(prefix + "/", run_dir, "--set", "storage.retry_seconds=1")
    proc = start_and_wait(cmd, _env(store), model_actor_started)
    outage(store, proc, hold=None)  # until the job gives up
    code, err = finish(proc)
    _no_traceback(err)
    assert code == 1, err[-3000:]
    line = _last_line(err)
    assert "unreachable" in line and "--mode resume" in line, line
    if target == "local":  # the reads failed, the commits did not: those images wait
        assert "images could not be read" in line, line
        embed = storage.read_json(storage.join(run_dir, "run.json"))["stages"]["embed"]
        assert embed["status"] == "failed" and embed["deferred"] > 0
        assert embed["embedded"] + embed["failed"] + embed["deferred"] == 147
    partial = read_outcome(run_dir)
    assert "deferred" not in partial.failures.values() and partial.duplicated == 0
    healthy_failed = [u for u in partial.failures if u.rsplit("/", 1)[-1] not in UNUSABLE]
    assert not healthy_failed

    done = subprocess.run(cmd, env=_env(store), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    check_complete(read_outcome(run_dir), prefix, reference)
    embed = storage.read_json(storage.join(run_dir, "run.json"))["stages"]["embed"]
    assert (embed["status"], embed["listed"], embed["embedded"], embed["failed"]) == (
        "done",
        147,
        144,
        3,
    )


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_exits_130_records_interrupted_and_a_resume_completes(
    images, reference, tmp_path, sig, code
):
    """SIGINT to the driver, as Ctrl-C in a terminal (or SIGTERM, as a pod being stopped),
    while images are still to come: exit 130 (143), one line, run.json says `interrupted`; a
    second run while the first holds the directory is refused first."""
    prefix = "file://" + str(images)
    run_dir = str(tmp_path / "run")
    cmd = embed_command(prefix + "/", run_dir)
    proc = start_and_wait(cmd, dict(os.environ), lambda _pid: committed_parts(run_dir) >= 1)
    # The model actor held still from the first commit on: the signal lands mid-run however
    # fast this machine embeds the other 18 parts.
    try:
        with actors_paused(proc.pid) as paused:
            assert paused, "no model actor below the driver"
            second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr[-2000:]
            _no_traceback(second.stderr)
            line = _last_line(second.stderr)
            assert "in use by another run" in line and f"pid {proc.pid}" in line, line
            assert "semclust unlock" in line, line
            assert committed_parts(run_dir) < 19
            proc.send_signal(sig)
            time.sleep(1)
    except BaseException:
        stop_group(proc)
        raise
    got, err = finish(proc, timeout=180)
    assert got == code, err[-3000:]
    _no_traceback(err)
    assert "interrupted" in _last_line(err)
    embed = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["embed"]
    assert embed["status"] == "interrupted" and "error" in embed
    assert not (tmp_path / "run" / "run.lock").exists()

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    check_complete(read_outcome(run_dir), prefix, reference)


def test_second_run_on_an_s3_run_dir_is_refused_with_the_holder(store, images, tmp_path):
    prefix = "file://" + str(images)
    run_dir = "s3://faults/runs/locked"
    cmd = embed_command(prefix + "/", run_dir)
    proc = start_and_wait(cmd, _env(store), model_actor_started)
    try:
        second = subprocess.run(cmd, env=_env(store), capture_output=True, text=True, timeout=120)
    finally:
        stop_group(proc)
    assert second.returncode == 2, second.stderr[-2000:]
    _no_traceback(second.stderr)
    line = _last_line(second.stderr)
    assert "in use by another run" in line and f"pid {proc.pid}" in line, line


def _small_filesystem(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def test_full_disk_stops_with_a_message_and_a_resume_completes(images, reference, tmp_path):
    """The run dir on a 256 KiB tmpfs: the embeddings (~750 KB) fill it part-way."""
    mnt = tmp_path / "small"
    if not _small_filesystem(mnt, "256k"):
        pytest.skip("cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        prefix = "file://" + str(images)
        run_dir = str(mnt / "run")
        cmd = embed_command(prefix + "/", run_dir)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        _no_traceback(proc.stderr)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "no space left" in _last_line(proc.stderr), _last_line(proc.stderr)
        partial = read_outcome(run_dir)
        assert partial.duplicated == 0 and committed_parts(run_dir) >= 1
        assert not [p for p in (mnt / "run").rglob(".tmp-*")], "temporary files left behind"

        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        check_complete(read_outcome(run_dir), prefix, reference)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_run_dir_that_is_a_file_is_one_message_and_exit_2(tmp_path):
    target = tmp_path / "not-a-dir"
    target.write_text("x")
    done = subprocess.run(
        [sys.executable, "-m", "semclust.cli", "embed", str(tmp_path), "--run-dir", str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    _no_traceback(done.stderr)
    assert "is a file" in _last_line(done.stderr)
