"""The embed stage from a real S3 server to a real S3 server: prefix, manifest, tar shards,
weights by URI, and a job killed midway then resumed."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from semclust import runner, storage
from semclust.config import load_config
from tests.faults import embed_command
from tests.s3server import upload_folder

pytestmark = pytest.mark.slow


def run_embed(cfg) -> dict:
    return runner.run_stages(cfg, ["embed"])["embed"]


def _cfg(input_uri: str, run_dir: str, **extra):
    overrides = {
        "run_dir": run_dir,
        "embed.input": input_uri,
        "embed.backbone": "efficientnet_lite0",
        "embed.weights": "default",
        "embed.rows_per_part": 20,
        "embed.batch_size": 16,
    }
    overrides.update(extra)
    return load_config(None, overrides)


def _read_run(run_dir: str) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    vectors: dict[str, np.ndarray] = {}
    for shard in storage.list_shards(storage.join(run_dir, "embeddings")):
        t = storage.read_parquet(shard)
        flat = t["embedding"].combine_chunks().flatten().to_numpy()
        for uri, vec in zip(t["uri"].to_pylist(), flat.reshape(t.num_rows, -1), strict=True):
            assert uri not in vectors, f"{uri} embedded twice"
            vectors[uri] = vec
    failures = [
        (u, e)
        for shard in storage.list_shards(storage.join(run_dir, "failures"))
        for u, e in zip(
            *storage.read_parquet(shard, ["uri", "error"]).to_pydict().values(), strict=True
        )
    ]
    return vectors, failures


def test_prefix_manifest_and_tar_shards_s3_to_s3(ray_local, s3_server, s3_bucket, demo_images):
    client = s3_server.client()
    n_files = upload_folder(client, s3_bucket, demo_images, "images")
    assert n_files == 76  # 72 photos, 3 unusable, README.txt

    record = run_embed(_cfg(f"s3://{s3_bucket}/images/", f"s3://{s3_bucket}/runs/prefix"))
    assert (record["listed"], record["embedded"], record["failed"]) == (75, 72, 3)
    vectors, failures = _read_run(f"s3://{s3_bucket}/runs/prefix")
    assert len(vectors) == 72 and all(u.startswith(f"s3://{s3_bucket}/images/") for u in vectors)
    assert {Path(u).name for u, _ in failures} == {"empty.jpg", "truncated.jpg", "not-an-image.png"}
    info = storage.read_json(f"s3://{s3_bucket}/runs/prefix/run.json")
    assert info["stages"]["embed"]["listed"] == 75

    # A manifest naming 10 of the images (one twice) and one missing object.
    chosen = sorted(vectors)[:10]
    csv = "uri\n" + "\n".join([*chosen, chosen[0], f"s3://{s3_bucket}/images/gone.jpg"]) + "\n"
    client.put_object(Bucket=s3_bucket, Key="manifest.csv", Body=csv.encode())
    record = run_embed(_cfg(f"s3://{s3_bucket}/manifest.csv", f"s3://{s3_bucket}/runs/manifest"))
    assert (record["listed"], record["embedded"], record["failed"], record["duplicate_uris"]) == (
        11,
        10,
        1,
        1,
    )
    m_vectors, m_failures = _read_run(f"s3://{s3_bucket}/runs/manifest")
    assert m_failures[0][0].endswith("gone.jpg") and "read failed" in m_failures[0][1]
    for uri in chosen:  # same image, same model: the same embedding
        np.testing.assert_allclose(m_vectors[uri], vectors[uri], atol=1e-5)

    # The same images packed as WebDataset-style tar shards.
    photos = sorted(
        p for p in demo_images.rglob("*.*") if p.parent.name != "_unusable" and p.suffix != ".txt"
    )
    for shard, start in enumerate(range(0, len(photos), 30)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for p in photos[start : start + 30]:
                key = f"{p.parent.name}_{p.stem}"
                for name, data in (
                    (f"{key}{p.suffix}", p.read_bytes()),
                    (f"{key}.cls", p.parent.name.encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        client.put_object(
            Bucket=s3_bucket, Key=f"shards/shard-{shard:03d}.tar", Body=buf.getvalue()
        )
    record = run_embed(_cfg(f"s3://{s3_bucket}/shards/", f"s3://{s3_bucket}/runs/tars"))
    assert (record["listed"], record["embedded"], record["failed"]) == (72, 72, 0)
    t_vectors, _ = _read_run(f"s3://{s3_bucket}/runs/tars")
    some = next(u for u in vectors if "/rocket/" in u)
    tar_uri = next(u for u in t_vectors if u.endswith("#rocket_" + Path(some).name))
    np.testing.assert_allclose(t_vectors[tar_uri], vectors[some], atol=1e-5)

    # No credential in any file the runs wrote.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    key_id = os.environ["AWS_ACCESS_KEY_ID"].encode()
    for obj in client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/")["Contents"]:
        body = client.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read()
        assert secret not in body and key_id not in body, obj["Key"]


def test_weights_from_a_uri_equal_the_local_file(s3_server, s3_bucket, tmp_path, monkeypatch):
    from semclust.embed.backbones import Embedder
    from semclust.embed.backbones.efficientnet_lite0 import default_weights_path

    monkeypatch.setenv("SEMCLUST_CACHE", str(tmp_path / "cache"))
    local = default_weights_path()
    s3_server.client().put_object(
        Bucket=s3_bucket, Key="w/lite0.pth", Body=Path(local).read_bytes()
    )
    pixels = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    from_uri = Embedder("efficientnet_lite0", f"s3://{s3_bucket}/w/lite0.pth", batch_size=3)
    from_file = Embedder("efficientnet_lite0", local, batch_size=3)
    np.testing.assert_array_equal(from_uri.embed(pixels), from_file.embed(pixels))
    cached = list((tmp_path / "cache" / "weights").glob("*-lite0.pth"))
    assert len(cached) == 1 and cached[0].stat().st_size == Path(local).stat().st_size


def test_wrong_credentials_and_missing_bucket_stop_at_once(s3_bucket, tmp_path):
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY="not-the-secret-at-all")
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "semclust.cli",
            "embed",
            f"s3://{s3_bucket}/images/",
            "--run-dir",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"cannot access s3://{s3_bucket}/images/" in proc.stderr
    assert "not-the-secret-at-all" not in proc.stderr + proc.stdout
    assert time.monotonic() - start < 60  # before any Ray or model start-up
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "semclust.cli",
            "embed",
            str(tmp_path),
            "--run-dir",
            "s3://no-such-bucket-semclust/r1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "bucket 'no-such-bucket-semclust' does not exist" in proc.stderr


def test_workers_get_the_storage_settings_from_the_config(s3_server, s3_bucket, demo_images):
    """The store's endpoint only in the config (``--set storage.endpoint_url``): the driver and
    the Ray workers it starts have no AWS_ENDPOINT_URL in their environment, so the lister, the
    read task, the decode tasks and the model actors reach the store only through the settings
    the run binds to them. A short retry budget: a worker without them fails fast."""
    upload_folder(s3_server.client(), s3_bucket, demo_images, "images")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS")
    }
    run_dir = f"s3://{s3_bucket}/runs/config-endpoint"
    cmd = embed_command(
        f"s3://{s3_bucket}/images/",
        run_dir,
        "--set",
        f"storage.endpoint_url={s3_server.endpoint}",
        "--set",
        "storage.retry_seconds=5",
        rows_per_part=20,
        batch_size=16,
    )
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    info = storage.read_json(f"{run_dir}/run.json")["stages"]["embed"]
    assert (info["status"], info["listed"], info["embedded"], info["failed"]) == ("done", 75, 72, 3)
    vectors, failures = _read_run(run_dir)
    assert len(vectors) == 72 and all(u.startswith(f"s3://{s3_bucket}/images/") for u in vectors)
    # The three unusable files were read and failed to decode; no read failed.
    assert {Path(u).name for u, _ in failures} == {"empty.jpg", "truncated.jpg", "not-an-image.png"}
    assert not [e for _, e in failures if e.startswith("read failed")], failures


def test_killed_job_resumes_without_repeating_or_losing_an_image(
    s3_server, s3_bucket, demo_images, tmp_path
):
    client = s3_server.client()
    upload_folder(client, s3_bucket, demo_images, "images")
    run_dir = f"s3://{s3_bucket}/runs/killed"
    cmd = embed_command(f"s3://{s3_bucket}/images/", run_dir, rows_per_part=10, batch_size=5)
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while len(storage.list_shards(f"{run_dir}/embeddings")) < 2:
            assert proc.poll() is None, (
                f"the job ended before it could be killed: {log.read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, "no part committed in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job: driver, raylet and workers
        proc.wait()
    committed_before = len(storage.list_shards(f"{run_dir}/embeddings"))
    assert committed_before < 8  # killed midway: 75 rows are 8 parts

    early = [
        storage.read_parquet(u, ["uri"])["uri"].to_pylist()
        for u in storage.list_shards(f"{run_dir}/embeddings")
    ]

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    info = storage.read_json(f"{run_dir}/run.json")["stages"]["embed"]
    assert info["listed"] == 75 and info["embedded"] == 72 and info["failed"] == 3
    assert 0 < info["processed_this_run"] < 75  # only what had not been committed
    vectors, failures = _read_run(run_dir)  # asserts every URI once
    assert len(vectors) == 72 and len(failures) == 3

    # Rows from before the kill and from the resumed run equal a fresh in-process embedding.
    from semclust.embed.backbones import Embedder
    from semclust.embed.decode import decode_image

    late = sorted(set(vectors) - {u for shard in early for u in shard})
    sample = [early[0][0], early[-1][-1], late[0], late[-1]]
    embedder = Embedder("efficientnet_lite0", "default", batch_size=4)
    pixels = np.stack([decode_image(storage.read_bytes(u), 224).pixels for u in sample])
    expected = embedder.embed(pixels)
    for uri, vec in zip(sample, expected, strict=True):
        np.testing.assert_allclose(vectors[uri], vec, atol=1e-4)
