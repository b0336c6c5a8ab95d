"""The line between transient and permanent storage errors, drawn on real errors: a real S3
server (missing key, denied key) and a port where nothing listens (connection refused)."""

from __future__ import annotations

import errno
import time

import pyarrow.fs as pafs
import pytest

from semclust.retry import RetryPolicy, is_transient, retry_call
from tests.s3server import ACCESS_KEY, SECRET_KEY, free_port


def _s3(endpoint: str, secret: str = SECRET_KEY) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        access_key=ACCESS_KEY,
        secret_key=secret,
        endpoint_override=endpoint.split("://", 1)[1],
        scheme="http",
        region="us-east-1",
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )


def _error(fn) -> BaseException:
    try:
        fn()
    except Exception as exc:
        return exc
    raise AssertionError("no error")


def test_connection_refused_is_transient():
    fs = _s3(f"http://127.0.0.1:{free_port()}")
    exc = _error(lambda: fs.open_input_stream("bucket/key.jpg").read())
    assert isinstance(exc, OSError) and "NETWORK_CONNECTION" in str(exc)
    assert is_transient(exc)


def test_missing_and_denied_objects_are_permanent(s3_server, s3_bucket, tmp_path):
    fs = _s3(s3_server.endpoint)
    missing = _error(lambda: fs.open_input_stream(f"{s3_bucket}/gone.jpg").read())
    assert isinstance(missing, FileNotFoundError) and not is_transient(missing)

    local = _error(lambda: (tmp_path / "gone.jpg").read_bytes())
    assert not is_transient(local)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    looped = _error(loop.read_bytes)
    assert isinstance(looped, OSError) and looped.errno == errno.ELOOP
    assert not is_transient(looped)


def test_a_wrong_secret_is_not_a_property_of_one_image(s3_server, s3_bucket, monkeypatch):
    """On S3 a HEAD says 403 both for a denied object and for a wrong or expired secret: the
    embed read asks the bucket, so credentials that fail for every object defer the image
    (the run stops, the resume reads it) instead of writing each image as a failure."""
    from semclust import storage
    from semclust.config import StorageConfig
    from semclust.embed import actors
    from semclust.embed.actors import read_one

    s3_server.client().put_object(Bucket=s3_bucket, Key="a.jpg", Body=b"x")
    uri = f"s3://{s3_bucket}/a.jpg"
    fs = _s3(s3_server.endpoint, secret="wrong-secret-wrong-secret")
    exc = _error(lambda: fs.open_input_stream(f"{s3_bucket}/a.jpg").read())
    assert "ACCESS_DENIED" in str(exc) and not is_transient(exc)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-wrong-secret")
    storage.forget_clients()
    storage._BUCKET_CHECKS.clear()
    try:
        with storage.using(StorageConfig(endpoint_url=s3_server.endpoint, retry_seconds=0)):
            data, error, transient = read_one((uri, -1, -1))
        assert data is None and "ACCESS_DENIED" in error and transient
    finally:
        monkeypatch.undo()
        storage.forget_clients()
        storage._BUCKET_CHECKS.clear()
        actors._STORES_DOWN.clear()  # the store this process found down: a new process
    assert read_one((uri, -1, -1)) == (b"x", "", False)
    data, error, transient = read_one((f"s3://{s3_bucket}/gone.jpg", -1, -1))
    assert data is None and not transient and "FileNotFoundError" in error


def test_a_store_down_past_the_budget_defers_the_next_reads_without_trying_them(
    s3_server, s3_bucket
):
    """Once a read has ridden out storage.retry_seconds and the bucket does not answer, the
    process's next reads of that store are deferred at once (no connection made), so a store
    away for an hour does not cost the budget once per image; once it answers, reads go on."""
    from semclust import storage
    from semclust.config import StorageConfig
    from semclust.embed import actors
    from tests.faults import RefusingPort

    s3_server.client().put_object(Bucket=s3_bucket, Key="b.jpg", Body=b"y")
    uri = f"s3://{s3_bucket}/b.jpg"
    port = free_port()
    refusing = RefusingPort(port)
    storage._BUCKET_CHECKS.clear()
    actors._STORES_DOWN.clear()
    try:
        down = StorageConfig(
            endpoint_url=f"http://127.0.0.1:{port}", retry_seconds=0.5, max_attempts=1
        )
        with storage.using(down):
            data, error, transient = actors.read_one((uri, -1, -1))
            assert data is None and transient and "NETWORK_CONNECTION" in error
            assert f"s3://{s3_bucket}" in actors._STORES_DOWN
            tried = refusing.attempts
            assert tried >= 2  # the read's own tries and the bucket probe
            for key in ("c.jpg", "d.jpg", "e.jpg"):
                data, error, transient = actors.read_one((f"s3://{s3_bucket}/{key}", -1, -1))
                assert data is None and transient
                assert "read deferred" in error and "unreachable" in error, error
            assert refusing.attempts == tried
        # The same bucket answering again (here: the session's server) is read as before,
        # once the store is due to be asked again (2 s after it was found down).
        time.sleep(2.1)
        with storage.using(StorageConfig(endpoint_url=s3_server.endpoint)):
            assert actors.read_one((uri, -1, -1)) == (b"y", "", False)
        assert not actors._STORES_DOWN
    finally:
        refusing.close()
        storage.forget_clients()
        storage._BUCKET_CHECKS.clear()
        actors._STORES_DOWN.clear()


def test_full_disk_and_bad_values_are_not_retried():
    assert not is_transient(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_transient(ValueError("bad uri"))
    assert is_transient(OSError(errno.EIO, "Input/output error"))  # a flaky network mount


def test_retry_call_rides_out_a_transient_error_within_the_budget():
    calls: list[float] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        return "ok"

    policy = RetryPolicy(seconds=10, first_delay=0.01, max_delay=0.05)
    assert retry_call(flaky, policy, "test") == "ok"
    assert len(calls) == 3


def test_retry_call_gives_up_after_the_budget_and_raises_the_last_error():
    calls = 0

    def down() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    start = time.monotonic()
    with pytest.raises(ConnectionResetError):
        retry_call(down, RetryPolicy(seconds=0.3, first_delay=0.02, max_delay=0.05), "test")
    assert 0.3 <= time.monotonic() - start < 2.0
    assert calls >= 3


def test_retry_call_raises_a_permanent_error_at_once():
    calls = 0

    def missing() -> None:
        nonlocal calls
        calls += 1
        raise FileNotFoundError(errno.ENOENT, "No such file")

    with pytest.raises(FileNotFoundError):
        retry_call(missing, RetryPolicy(seconds=5), "test")
    assert calls == 1
