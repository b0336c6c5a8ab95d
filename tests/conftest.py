"""Shared fixtures: one local Ray for the session, and the small real-image set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


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
