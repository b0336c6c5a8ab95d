"""Shared fixtures: one local Ray for the session, and the small real-image set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.s3server import ACCESS_KEY, SECRET_KEY, S3Server, free_port, start_s3_server

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The test S3 server's credentials and endpoint go in the standard AWS variables before any Ray
# worker starts, so every worker of the session reaches the same local server.
_S3_PORT = free_port()
os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{_S3_PORT}"
os.environ["AWS_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs, as on the CI machine (Ray's own tests use the same)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory) -> Path:
    """12 classes x 6 real photos (crops/flips/colour changes) plus 3 unusable files."""
    from semclust.demo import build_demo_images

    root = tmp_path_factory.mktemp("demo-images")
    build_demo_images(root, per_class=6, seed=0)
    return root


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """A real S3 server (SeaweedFS) on 127.0.0.1 for the whole session."""
    server = start_s3_server(tmp_path_factory.mktemp("s3"), s3_port=_S3_PORT)
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket per test, named after it."""
    import re

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") or "bucket"
    name = f"t-{name}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium with one page (tests.report.cdp), closed after the test."""
    from tests.report.cdp import Browser, find_chromium

    executable = find_chromium()
    if executable is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    profile = tmp_path / "profile"
    profile.mkdir()
    b = Browser(executable, profile)
    yield b
    b.close()
