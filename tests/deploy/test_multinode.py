"""The embed stage on a head and two worker nodes (`ray.cluster_utils.Cluster`), losing a worker
midway: the model actors ran on both workers and every image ends in exactly one row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.rayhead import kill_tree

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_losing_a_worker_node_midway_still_yields_every_image_once(demo_images, tmp_path):
    report_path = tmp_path / "report.json"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("RAY_ADDRESS", None)
    with open(tmp_path / "multinode.log", "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("multinode_embed.py")),
                str(demo_images),
                str(tmp_path / "run"),
                str(report_path),
            ],
            cwd=REPO,
            env=dict(env, PYTHONPATH=str(REPO)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            proc.wait(timeout=900)
        finally:
            kill_tree(proc, grace=10)
    output = (tmp_path / "multinode.log").read_text(errors="replace")[-4000:]
    assert report_path.exists(), output
    report = json.loads(report_path.read_text())
    print("\nmulti-node report:", json.dumps(report, default=str))

    # Scheduling: the head has no CPU, so every model actor ran on a worker, and on both.
    workers = set(report["worker_nodes"])
    assert set(report["actor_nodes_seen"]) >= workers, report
    # The failure really happened midway.
    assert report["removed"], output
    assert 1 <= report["parts_committed_before_removal"] < 15, report  # 75 rows, 5 per part
    # Every image exactly once, after a resume if the first attempt failed.
    assert report["attempts"][-1]["ok"], report["attempts"]
    counts = report["counts"]
    assert counts["listed"] == 75 and counts["duplicates"] == 0 and counts["stale"] == 0
    assert (counts["embedded"], counts["failed"]) == (72, 3)
    assert report["rows"] == report["distinct_uris"] == 75
