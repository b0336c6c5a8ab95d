"""A small real run for the report tests: real photos, efficientnet_lite0, k-means on local Ray.

The labels/ and duplicates/ stages do not exist yet, so their files (and model/k_selection.json)
are written here from the run's own image ids, in the documented schemas.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pytest

from semclust import storage
from tests.report.helpers import (
    EVIL_FAILURE,
    EVIL_IMAGE,
    N_CLASSES,
    PER_CLASS,
    UNLABELLED_CLASS,
    embedded_images,
    repo_root,
    run_report,
)


@pytest.fixture(scope="session")
def report_images(demo_images, tmp_path_factory) -> Path:
    """The demo images plus one more failure and one more good image with hostile names."""
    root = tmp_path_factory.mktemp("report-images") / "images"
    shutil.copytree(demo_images, root)
    (root / "_unusable" / EVIL_FAILURE).write_bytes(b"\xff\xd8\xff not really a jpeg")
    shutil.copy(root / "coffee" / "coffee-000.jpg", root / "coffee" / EVIL_IMAGE)
    return root


def _cli(args: list[str]) -> None:
    from semclust.cli import main

    assert main(args) == 0, args


@pytest.fixture(scope="session")
def report_run(ray_local, report_images, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("report-run") / "run"
    _cli(
        [
            "embed",
            str(report_images),
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
    _cli(["cluster", "--run-dir", str(run), "--k", str(N_CLASSES)])
    _cli(["evaluate", "--run-dir", str(run)])
    _write_labels_duplicates_and_k_selection(run)
    return run


def _write_labels_duplicates_and_k_selection(run: Path) -> None:
    images = embedded_images(run)
    ids = sorted(images)
    classes = [images[i].split("/")[-2] for i in ids]
    labelled = [(i, c) for i, c in zip(ids, classes, strict=True) if c != UNLABELLED_CLASS]
    labels = pa.table(
        {
            "image_id": pa.array([i for i, _ in labelled], pa.int64()),
            # A label that is markup, to check that labels are escaped too.
            "label": pa.array(
                ["<i>coffee</i>" if c == "coffee" else c for _, c in labelled], pa.string()
            ),
            "confidence": pa.array(
                [0.9 if n % 2 else 0.6 for n in range(len(labelled))], pa.float32()
            ),
            "source": pa.array(["seed-labels"] * len(labelled), pa.string()),
        }
    )
    storage.write_parquet(str(run / "labels" / "part-00000.parquet"), labels)

    # Two groups of near-duplicates (the first images of two classes) and one lone image,
    # which is not a group and must not be shown.
    by_class: dict[str, list[int]] = {}
    for i, c in zip(ids, classes, strict=True):
        by_class.setdefault(c, []).append(i)
    groups = {7: by_class["rocket"][:3], 9: by_class["chelsea"][:2], 11: by_class["camera"][:1]}
    dup_ids = [i for members in groups.values() for i in members]
    dup_groups = [g for g, members in groups.items() for _ in members]
    storage.write_parquet(
        str(run / "duplicates" / "part-00000.parquet"),
        pa.table(
            {"image_id": pa.array(dup_ids, pa.int64()), "group": pa.array(dup_groups, pa.int64())}
        ),
    )
    # The shape the cluster stage writes with k=auto (numbers made up: only shown, not used).
    k_selection = {
        "chosen_k": 12,
        "rule": "best silhouette",
        "candidates": [
            {"k": k, "objective": round(60.0 / k, 3), "silhouette": round(0.1 + k / 100, 3)}
            for k in (8, 12, 16)
        ],
    }
    (run / "model" / "k_selection.json").write_text(json.dumps(k_selection))


@pytest.fixture(scope="session")
def built_report(report_run) -> dict[str, object]:
    """The report of the small run in its default place, and how long it took."""
    start = time.perf_counter()
    uri = run_report(report_run)["uri"]
    seconds = time.perf_counter() - start
    artifacts = repo_root() / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "report-generation.json").write_text(
        json.dumps({"images": N_CLASSES * PER_CLASS + 1, "clusters": N_CLASSES, "seconds": seconds})
        + "\n"
    )
    return {"uri": uri, "dir": report_run / "report", "seconds": seconds}
