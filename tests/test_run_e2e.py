"""End to end: `semclust run` on real photos, on a real local Ray with 2 CPUs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from semclust import storage
from semclust.cli import main
from semclust.evaluate import clustering_scores, truth_from_folders
from semclust.rundir.embeddings import read_embeddings

pytestmark = pytest.mark.slow

N_CLASSES, PER_CLASS, N_UNUSABLE = 12, 6, 3


@pytest.fixture(scope="module")
def run_dir(ray_local, demo_images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "run"
    code = main(
        [
            "run",
            str(demo_images),
            "--run-dir",
            str(out),
            "--backbone",
            "efficientnet_lite0",
            "--weights",
            "default",
            "--k",
            str(N_CLASSES),
            "--knn-k",
            "5",
            "--rows-per-part",
            "25",
            "--batch-size",
            "16",
        ]
    )
    assert code == 0
    return out


def _all_embeddings(run_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    ids, vecs, uris = [], [], []
    for shard in storage.list_shards(str(run_dir / "embeddings")):
        i, v = read_embeddings(shard)
        ids.append(i)
        vecs.append(v)
        uris += pq.read_table(shard, columns=["uri"])["uri"].to_pylist()
    return np.concatenate(ids), np.concatenate(vecs), uris


def test_run_directory_contents_counts_and_schema(run_dir):
    info = json.loads((run_dir / "run.json").read_text())
    embed = info["stages"]["embed"]
    assert embed["listed"] == N_CLASSES * PER_CLASS + N_UNUSABLE
    assert embed["embedded"] == N_CLASSES * PER_CLASS
    assert embed["failed"] == N_UNUSABLE
    assert embed["listed"] == embed["embedded"] + embed["failed"]
    assert embed["skipped_non_image"] == 1  # README.txt
    assert info["config"]["embed"]["backbone"] == "efficientnet_lite0"
    assert "ray" in info["versions"] and "faiss-cpu" in info["versions"]
    assert set(info["stages"]) == {"embed", "cluster", "graph", "index", "report"}
    assert (run_dir / "report" / "index.html").is_file()  # `semclust run` ends with the report

    names = sorted(p.name for p in (run_dir / "embeddings").iterdir())
    assert names == [f"part-{i:05d}.parquet" for i in range(3)]  # 75 rows / 25 per part
    schema = pq.read_schema(run_dir / "embeddings" / names[0])
    assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[1280]"
    assert [schema.field(c).type for c in ("image_id", "width", "height")] == [
        pq.read_schema(run_dir / "embeddings" / names[0]).field("image_id").type,
        *["int32", "int32"],
    ]
    ids, vecs, uris = _all_embeddings(run_dir)
    assert len(set(ids.tolist())) == len(ids) == N_CLASSES * PER_CLASS
    assert [storage.image_id_for(u) for u in uris] == ids.tolist()
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    widths = pq.read_table(run_dir / "embeddings" / names[0], columns=["width"])["width"]
    assert min(widths.to_pylist()) >= 128  # original sizes, not the 224 model input

    failures = {
        Path(u).name: (stage, err)
        for shard in storage.list_shards(str(run_dir / "failures"))
        for u, stage, err in zip(
            *pq.read_table(shard, columns=["uri", "stage", "error"]).to_pydict().values(),
            strict=True,
        )
    }
    assert failures["empty.jpg"] == ("decode", "empty file")
    assert "truncated" in failures["truncated.jpg"][1]
    assert "not a recognised image" in failures["not-an-image.png"][1]

    for folder in ("assignments", "knn"):
        assert sorted(p.name for p in (run_dir / folder).iterdir()) == names
    assert (run_dir / "model" / "centroids.npy").is_file()
    kmeans = json.loads((run_dir / "model" / "kmeans.json").read_text())
    assert kmeans["k"] == N_CLASSES and kmeans["objective"] is not None
    assert {p.name for p in (run_dir / "index").iterdir()} == {
        "index.faiss",
        "ids.parquet",
        "meta.json",
    }


def test_kmeans_recovers_the_photo_groups(run_dir):
    table = pq.read_table(run_dir / "assignments")
    ids, _, uris = _all_embeddings(run_dir)
    uri_of = dict(zip(ids.tolist(), uris, strict=True))
    truth = truth_from_folders([uri_of[i] for i in table["image_id"].to_pylist()])
    scores = clustering_scores(truth, table["cluster"].to_pylist())
    assert scores["nmi"] > 0.85, scores
    assert scores["ari"] > 0.5, scores
    # The second-nearest centroid is a different one, and never nearer.
    assert (table["cluster"].to_numpy() != table["cluster_2nd"].to_numpy()).all()
    assert (table["distance"].to_numpy() <= table["distance_2nd"].to_numpy() + 1e-6).all()


def test_knn_graph_matches_brute_force(run_dir):
    ids, vecs, _ = _all_embeddings(run_dir)
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    expected_sims = np.take_along_axis(sims, order, axis=1)
    graph = pq.read_table(run_dir / "knn").to_pydict()
    row_of = {i: r for r, i in enumerate(ids.tolist())}
    assert sorted(graph["image_id"]) == sorted(ids.tolist())
    for image_id, neighbors, similarities in zip(
        graph["image_id"], graph["neighbors"], graph["similarities"], strict=True
    ):
        r = row_of[image_id]
        assert image_id not in neighbors
        np.testing.assert_allclose(similarities, expected_sims[r], atol=1e-5)
        # Same neighbours as NumPy's (ties aside: compare by similarity where they differ).
        got = [row_of[n] for n in neighbors]
        np.testing.assert_allclose(sims[r, got], expected_sims[r], atol=1e-5)


def test_search_returns_the_query_siblings_first(run_dir, tmp_path):
    from semclust.demo import make_query_image

    query = make_query_image(tmp_path / "q.jpg", "chelsea", seed=4242)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "semclust.cli",
            "search",
            "--run-dir",
            str(run_dir),
            "--image",
            str(query),
            "-k",
            "5",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    hits = json.loads(proc.stdout)[0]["results"]
    assert len(hits) == 5
    assert all("/chelsea/" in h["uri"] for h in hits), hits
    assert hits[0]["similarity"] >= hits[-1]["similarity"] > 0.5


def test_search_with_a_member_finds_itself_first(run_dir, demo_images):
    from semclust.index.search import SearchIndex

    member = demo_images / "rocket" / "rocket-002.webp"
    hits = SearchIndex(str(run_dir)).search_images([str(member)], k=3)[0]
    assert hits[0].uri == f"file://{member}"
    assert hits[0].similarity == pytest.approx(1.0, abs=1e-4)
    assert all("/rocket/" in h.uri for h in hits)


def test_resume_redoes_only_uncommitted_parts(run_dir, demo_images, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    before = {i: v for i, v in zip(*_all_embeddings(work)[:2], strict=True)}
    args = [
        "embed",
        str(demo_images),
        "--run-dir",
        str(work),
        "--backbone",
        "efficientnet_lite0",
        "--weights",
        "default",
        "--rows-per-part",
        "25",
        "--batch-size",
        "16",
    ]
    assert main(args) == 0
    info = json.loads((work / "run.json").read_text())["stages"]["embed"]
    assert info["processed_this_run"] == 0
    # Lose one committed part, as if the job had died before committing it.
    (work / "embeddings" / "part-00001.parquet").unlink()
    assert main(args) == 0
    info = json.loads((work / "run.json").read_text())["stages"]["embed"]
    assert info["processed_this_run"] == 25
    assert info["embedded"] + info["failed"] == info["listed"]
    after = {i: v for i, v in zip(*_all_embeddings(work)[:2], strict=True)}
    assert after.keys() == before.keys()
    for image_id, vec in before.items():
        np.testing.assert_allclose(after[image_id], vec, atol=1e-5)
    assert (work / "embeddings" / "part-00003.parquet").is_file()  # new part, never a reuse


def test_resume_refuses_other_backbone_settings(run_dir, demo_images, tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    code = main(
        [
            "embed",
            str(demo_images),
            "--run-dir",
            str(work),
            "--backbone",
            "resnet50",
            "--weights",
            "random",
        ]
    )
    assert code == 2
    assert "--mode overwrite" in capsys.readouterr().err


def test_k_larger_than_images_stops_with_a_message(run_dir, tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    assert main(["cluster", "--run-dir", str(work), "--k", "500"]) == 2
    assert "cluster.k=500 is larger than the 72 embedded images" in capsys.readouterr().err
