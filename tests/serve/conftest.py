"""A real run of the demo photos (embed, cluster, graph, index) and `semclust serve` over it, run
as its own process on 127.0.0.1, the way a user starts it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.serve.server import Server

N_CLASSES = 12
PER_CLASS = 6  # tests/conftest.py demo_images
KNN_K = 5


def clusters_of(assignments: Any) -> dict[int, int]:
    """image id -> cluster of an assignments table."""
    ids = assignments.column("image_id").to_pylist()
    return dict(zip(ids, assignments.column("cluster").to_pylist(), strict=True))


def _cli(args: list[str]) -> None:
    from semclust.cli import main

    assert main(args) == 0, args


@pytest.fixture(scope="session")
def serve_run(ray_local, demo_images, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("serve-run") / "run"
    _cli(
        [
            "embed",
            str(demo_images),
            "--run-dir",
            str(run),
            "--backbone",
            "efficientnet_lite0",
            "--weights",
            "default",
            "--rows-per-part",
            "25",
            "--batch-size",
            "16",
        ]
    )
    _cli(["cluster", "--run-dir", str(run), "--k", str(N_CLASSES), "--set", "cluster.nredo=5"])
    _cli(["graph", "--run-dir", str(run), "--knn-k", str(KNN_K)])
    _cli(["index", "--run-dir", str(run)])
    return run


@pytest.fixture
def run_copy(serve_run, tmp_path) -> Path:
    """A copy of the run that a test may change (names, labels)."""
    return Path(shutil.copytree(serve_run, tmp_path / "run"))


@pytest.fixture(scope="module")
def server(serve_run, tmp_path_factory):
    """`semclust serve` on the shared run, with a 2 MiB body limit."""
    logs = tmp_path_factory.mktemp("serve-logs")
    with Server(serve_run, logs, "--max-upload-mb", "2") as s:
        yield s
