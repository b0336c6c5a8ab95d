"""`semclust select-backbone`: one seeded sample, embedded by each backbone, ranked by score."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from semclust import runinfo
from semclust.cli import main
from semclust.compare import image_set_fingerprint
from semclust.errors import UserError
from semclust.select_backbone import rank_backbones, select_backbone

SAMPLE, K = 60, 12
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1")


@pytest.fixture(scope="module")
def selection(ray_local, demo_images, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("select") / "sel"
    args = ["select-backbone", str(demo_images), "--out", str(out), "--backbones", *BACKBONES]
    args += ["--sample", str(SAMPLE), "-k", str(K), "--truth", "folder-names"]
    args += ["--set", "embed.weights=default", "--set", "embed.batch_size=32"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0
    return out, printed.getvalue()


@pytest.mark.slow
def test_every_backbone_embeds_the_same_sample_and_is_ranked_by_truth(
    selection, demo_images
) -> None:
    out, printed = selection
    sample = pq.read_table(out / "sample.parquet").column("uri").to_pylist()
    assert len(sample) == len(set(sample)) == SAMPLE
    assert all(u.removeprefix("file://").startswith(f"{demo_images}/") for u in sample)
    fingerprints = set()
    for name in BACKBONES:
        record = runinfo.load(str(out / name))["stages"]["embed"]
        assert record["embedder"]["backbone"] == name
        # listed = embedded + failed, over the sample only (the demo's unusable files fail).
        assert record["listed"] == SAMPLE == record["embedded"] + record["failed"]
        assert record["embedded"] >= SAMPLE - 3
        fingerprints.add(image_set_fingerprint(str(out / name)))
    assert len(fingerprints) == 1  # the same images, so the scores compare fairly

    result = json.loads((out / "selection.json").read_text())
    ranked = result["backbones"]
    assert [r["rank"] for r in ranked] == [1, 2]
    assert sorted(r["backbone"] for r in ranked) == sorted(BACKBONES)
    assert result["chosen"] == ranked[0]["backbone"]
    for r in ranked:
        # Real ImageNet features separate the demo's 12 photo groups well.
        assert r["nmi"] > 0.7 and r["acc"] > 0.5
        assert r["score"] == pytest.approx((r["acc"] + r["nmi"]) / 2)
        assert r["silhouette"] is not None and r["stability_ari"] is not None
        assert 0 < r["knn_agreement"] <= 1
    assert ranked[0]["score"] >= ranked[1]["score"]
    assert f"chosen: --backbone {result['chosen']}" in printed
    assert "| rank | backbone |" in printed


@pytest.mark.slow
def test_a_second_call_reuses_the_sample_and_runs(selection, demo_images) -> None:
    out, _ = selection
    before = (out / "sample.parquet").read_bytes()
    parts = {name: sorted((out / name / "embeddings").iterdir()) for name in BACKBONES}
    again = select_backbone(
        str(demo_images),
        str(out),
        BACKBONES,
        sample=SAMPLE,
        k=K,
        truth="folder-names",
        overrides={"embed.weights": "default"},
    )
    assert (out / "sample.parquet").read_bytes() == before
    assert {n: sorted((out / n / "embeddings").iterdir()) for n in BACKBONES} == parts
    first = json.loads((out / "selection.json").read_text())
    assert [r["backbone"] for r in again["backbones"]] == [
        r["backbone"] for r in first["backbones"]
    ]
    with pytest.raises(UserError, match="holds a sample of"):
        select_backbone(str(demo_images), str(out), BACKBONES, sample=SAMPLE - 10, k=K)


def test_label_free_ranking_is_the_mean_rank_of_silhouette_stability_and_knn_agreement() -> None:
    rows = [
        {"backbone": "a", "silhouette": 0.30, "stability_ari": 0.70, "knn_agreement": 0.80},
        {"backbone": "b", "silhouette": 0.20, "stability_ari": 0.95, "knn_agreement": 0.70},
        {"backbone": "c", "silhouette": 0.25, "stability_ari": 0.90, "knn_agreement": 0.75},
        {"backbone": "d", "silhouette": None, "stability_ari": 0.99, "knn_agreement": 0.60},
    ]
    ranked = rank_backbones(rows, with_truth=False)
    # Silhouette ranks a1 c2 b3 d4 (a missing score is worst), stability d1 b2 c3 a4, kNN
    # agreement a1 c2 b3 d4: means a 2, c 7/3, b 8/3, d 3.
    scores = {r["backbone"]: -r["score"] for r in ranked}
    assert scores == pytest.approx({"a": 2, "c": 7 / 3, "b": 8 / 3, "d": 3})
    assert [r["backbone"] for r in ranked] == ["a", "c", "b", "d"]
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4]
    # Equal means are broken by name, so the order is stable from run to run.
    tied = [
        {"backbone": "y", "silhouette": 0.2, "stability_ari": 0.9, "knn_agreement": 0.5},
        {"backbone": "x", "silhouette": 0.3, "stability_ari": 0.8, "knn_agreement": 0.5},
    ]
    assert [r["backbone"] for r in rank_backbones(tied, with_truth=False)] == ["x", "y"]

    clear = [
        {"backbone": "weak", "silhouette": 0.1, "stability_ari": 0.5, "knn_agreement": 0.5},
        {"backbone": "strong", "silhouette": 0.4, "stability_ari": 0.9, "knn_agreement": 0.9},
        {"backbone": "mixed", "silhouette": 0.3, "stability_ari": 0.4, "knn_agreement": 0.7},
    ]
    assert [r["backbone"] for r in rank_backbones(clear, with_truth=False)] == [
        "strong", "mixed", "weak",
    ]  # fmt: skip
    truth = [
        {"backbone": "x", "acc": 0.6, "nmi": 0.7, "silhouette": 0.9},
        {"backbone": "y", "acc": 0.8, "nmi": 0.7, "silhouette": 0.1},
    ]
    assert [r["backbone"] for r in rank_backbones(truth, with_truth=True)] == ["y", "x"]


def test_bad_arguments_stop_before_any_work(tmp_path, demo_images) -> None:
    with pytest.raises(UserError, match="name each once"):
        select_backbone(str(demo_images), str(tmp_path / "o"), ["vgg16"])
    with pytest.raises(UserError, match="too small"):
        select_backbone(str(demo_images), str(tmp_path / "o"), ["efficientnet_lite0"], sample=10)
    assert not (tmp_path / "o").exists()
