"""storage.py against a real S3 server (SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

from semclust import storage
from semclust.config import StorageConfig
from semclust.context import RunContext


@pytest.fixture(autouse=True)
def _fresh_s3_clients():
    # Tests change credentials in the environment: S3 clients are cached per settings.
    storage.forget_clients()
    yield
    storage.forget_clients()


def test_parquet_and_bytes_round_trip(s3_bucket):
    table = pa.table({"x": [1, 2, 3]})
    storage.write_parquet(f"s3://{s3_bucket}/run/embeddings/part-00000.parquet", table)
    storage.write_bytes(f"s3://{s3_bucket}/run/model/a.bin", b"abc")
    storage.write_json(f"s3://{s3_bucket}/run/run.json", {"k": 1})
    assert storage.read_parquet(f"s3://{s3_bucket}/run/embeddings/part-00000.parquet").equals(table)
    assert storage.read_bytes(f"s3://{s3_bucket}/run/model/a.bin") == b"abc"
    assert storage.read_json(f"s3://{s3_bucket}/run/run.json") == {"k": 1}
    assert storage.list_shards(f"s3://{s3_bucket}/run/embeddings") == [
        f"s3://{s3_bucket}/run/embeddings/part-00000.parquet"
    ]
    files = sorted(u for u, _ in storage.list_files(f"s3://{s3_bucket}/run"))
    assert files == [
        f"s3://{s3_bucket}/run/embeddings/part-00000.parquet",
        f"s3://{s3_bucket}/run/model/a.bin",
        f"s3://{s3_bucket}/run/run.json",
    ]


def test_endpoint_from_options_not_only_env(s3_server, s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    with storage.using(StorageConfig(endpoint_url=s3_server.endpoint, region="us-east-1")):
        storage.write_bytes(f"s3://{s3_bucket}/a.txt", b"hi")
        assert storage.read_bytes(f"s3://{s3_bucket}/a.txt") == b"hi"


def test_wrong_secret_fails_at_once_without_leaking_it(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-not-the-secret")
    storage.forget_clients()
    with pytest.raises(ValueError) as err:
        storage.check_access(f"s3://{s3_bucket}/images", must_exist=False)
    message = str(err.value)
    assert message.startswith(f"cannot access s3://{s3_bucket}/images:")
    assert "Check the credentials" in message
    assert "definitely-not-the-secret" not in message
    assert os.environ["AWS_ACCESS_KEY_ID"] not in message


def test_missing_bucket_and_missing_prefix(s3_bucket):
    with pytest.raises(ValueError, match="bucket 'no-such-bucket-here' does not exist"):
        storage.check_access("s3://no-such-bucket-here/runs/r1", must_exist=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.check_access(f"s3://{s3_bucket}/not/there", must_exist=True)
    storage.check_access(f"s3://{s3_bucket}/new/run", must_exist=False)  # may be created


def test_storage_section_of_the_config_reaches_ray_workers(
    s3_server, s3_bucket, monkeypatch, tmp_path, ray_local
):
    """S3 settings written only in the YAML config (no AWS_ENDPOINT_URL) reach the driver and the
    workers of Ray tasks, which on a real cluster have only their own environment."""
    import ray

    from semclust.cli import build_parser, config_from_args

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    config = tmp_path / "run.yaml"
    config.write_text(f"storage:\n  endpoint_url: {s3_server.endpoint}\n  region: eu-west-3\n")
    args = build_parser().parse_args(
        ["cluster", "--config", str(config), "--run-dir", f"s3://{s3_bucket}/r"]
    )
    cfg = config_from_args(args)
    ctx = RunContext(cfg)
    assert ctx.storage == StorageConfig(endpoint_url=s3_server.endpoint, region="eu-west-3")
    with storage.using(cfg.storage):
        storage.write_bytes(f"s3://{s3_bucket}/from-config.txt", b"config")
    assert storage.options().region != "eu-west-3"  # only inside the run's context

    def read_in_worker(uri: str) -> tuple[StorageConfig, bytes]:
        return storage.options(), storage.read_bytes(uri)

    class Reader:
        def read(self, uri: str) -> tuple[StorageConfig, bytes]:
            return storage.options(), storage.read_bytes(uri)

    uri = f"s3://{s3_bucket}/from-config.txt"
    options, data = ray.get(ctx.remote(read_in_worker).remote(uri))
    assert options.region == "eu-west-3" and options.endpoint_url == s3_server.endpoint
    assert data == b"config"
    actor = ctx.remote(Reader).remote()
    options, data = ray.get(actor.read.remote(uri))
    assert options.region == "eu-west-3" and data == b"config"
    assert "secret" not in repr(cfg.storage).lower()


def test_threads_and_generators_keep_the_settings_they_were_bound_to():
    import threading

    from semclust.context import bind_storage

    section = StorageConfig(endpoint_url="http://bound-host:1", region="eu-north-1")
    seen: list[str | None] = []
    with storage.using(section):
        worker = threading.Thread(
            target=storage.carry(lambda: seen.append(storage.options().region))
        )
        bare = threading.Thread(target=lambda: seen.append(storage.options().region))
        worker.start(), bare.start()
        worker.join(), bare.join()
    assert seen[0] == "eu-north-1" and seen[1] != "eu-north-1"

    def regions():
        for _ in range(3):
            yield storage.options().region

    assert list(bind_storage(regions, section)()) == ["eu-north-1"] * 3
    assert storage.options().region != "eu-north-1"


def test_config_fields_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env-host:1")
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    merged = storage.resolved(StorageConfig(region="ap-south-1"))
    assert merged == StorageConfig(endpoint_url="http://env-host:1", region="ap-south-1")
    merged = storage.resolved(
        StorageConfig(endpoint_url="https://minio.local:9000", anonymous=True)
    )
    assert merged.endpoint_url == "https://minio.local:9000" and merged.anonymous
    assert merged.region == "us-west-2"


def test_awkward_keys_round_trip(s3_server, s3_bucket):
    """Keys are raw in URIs: '#', '?', '%', '+', spaces and unicode are parts of the name."""
    from tests.storage.test_local import AWKWARD_NAMES

    client = s3_server.client()
    prefix = "pre fix#?%20+"
    for name in AWKWARD_NAMES:
        client.put_object(Bucket=s3_bucket, Key=f"{prefix}/{name}", Body=name.encode())
    base = f"s3://{s3_bucket}/{prefix}"
    expected = sorted(f"{base}/{n}" for n in AWKWARD_NAMES)
    listed = [u for p in storage.iter_file_pages(base, page_size=4) for u in p["uri"].to_pylist()]
    assert sorted(listed) == expected  # SeaweedFS lists folder by folder, not in key order
    assert sorted(u for u, _ in storage.list_files(base)) == expected
    for uri in expected:
        assert storage.read_bytes(uri) == uri.rsplit("/", 1)[1].encode()
        assert storage.exists(uri)
    storage.write_bytes(f"{base}/written #1?.bin", b"w")
    assert client.get_object(Bucket=s3_bucket, Key=f"{prefix}/written #1?.bin")["Body"].read() == (
        b"w"
    )


def test_local_copy_downloads_once_per_version_and_drops_older_ones(
    s3_bucket, tmp_path, monkeypatch
):
    """An index or its re-rank vectors on S3 are memory-mapped from a local copy: downloaded
    in chunks (here 3 bytes), kept while the object is unchanged, replaced when it is
    rewritten; a missing object is a FileNotFoundError, not an empty copy."""
    import time

    monkeypatch.setenv("SEMCLUST_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{s3_bucket}/run/index/vectors.f16.npy"
    storage.write_bytes(uri, b"0123456789")
    first = storage.local_copy(uri, chunk=3)
    assert first.startswith(str(tmp_path / "cache"))
    assert Path(first).read_bytes() == b"0123456789"
    stamp = os.stat(first).st_mtime_ns
    assert storage.local_copy(uri) == first and os.stat(first).st_mtime_ns == stamp
    time.sleep(1.1)  # S3 modification times are in seconds
    storage.write_bytes(uri, b"abcdefghijklmnop")
    second = storage.local_copy(uri)
    assert second != first and Path(second).read_bytes() == b"abcdefghijklmnop"
    assert sorted(os.listdir(tmp_path / "cache" / "files")) == [os.path.basename(second)]
    with pytest.raises(FileNotFoundError, match="no such object"):
        storage.local_copy(f"s3://{s3_bucket}/run/index/absent.npy")
    local = tmp_path / "here.bin"
    local.write_bytes(b"x")
    assert storage.local_copy(str(local)) == str(local)  # a local file is its own copy
