"""The index stage and search on seeded synthetic embeddings: the choice of type by N, dimension
and memory budget, each type's search against exact search within its recorded recall, search
by image_id, and refusals (no type fits, another backbone)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from semclust.cli import main
from semclust.config import load_config
from semclust.index.build import run_index
from semclust.index.factory import auto_nlist, choose_spec, pq_candidates
from semclust.index.search import SearchIndex
from tests.clustering.synthetic import planted, write_run

N, DIM = 20_000, 32
GiB = 1 << 30


def _cfg(run_dir, **overrides):
    return load_config(None, {"run_dir": str(run_dir), "mode": "overwrite", **overrides})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Database rows, fresh query rows from the same planted clusters, and a run directory."""
    x, _, _ = planted(N + 300, 100, DIM, noise=0.6, seed=21)
    run_dir = tmp_path_factory.mktemp("index") / "run"
    ids = write_run(run_dir, x[:N], rows_per_part=5_000)
    return run_dir, x[:N], x[N:], ids


def _exact_top10(database: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    db = database / np.linalg.norm(database, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ db.T.astype(np.float64)
    rows = np.argsort(-sims, axis=1)[:, :10]
    return rows, np.take_along_axis(sims, rows, axis=1)


def test_choice_by_size_dimension_and_budget():
    assert choose_spec(50_000, 256, "cosine").kind == "flat"
    assert choose_spec(500_000, 256, "cosine").kind == "hnsw"
    assert choose_spec(500_000, 256, "cosine", gpu=True).kind == "ivf_flat"
    assert choose_spec(500_000, 1024, "cosine").kind == "ivf_flat"  # HNSW builds slowly at 1024-d
    big = choose_spec(10_000_000, 2048, "cosine", memory=8 * GiB)
    assert big.kind == "ivf_pq" and big.memory_bytes(10_000_000) <= 8 * GiB
    for m in (m for m in pq_candidates(2048) if m > big.pq_m):  # the most bytes that fit
        bigger = choose_spec(10_000_000, 2048, "cosine", kind="ivf_pq", pq_m=m)
        assert bigger.memory_bytes(10_000_000) > 8 * GiB
    assert big.pq_m == 512
    assert choose_spec(10_000_000, 2048, "cosine", memory=100 * GiB).kind == "ivf_flat"
    assert auto_nlist(10_000_000) == 16_384 and auto_nlist(1_000) == 25
    with pytest.raises(ValueError, match="no index type fits 10000000 vectors of dimension 2048"):
        choose_spec(10_000_000, 2048, "cosine", memory=64 << 20)
    with pytest.raises(ValueError, match="over the index memory budget"):
        choose_spec(1_000, 64, "cosine", kind="flat", memory=1024)
    with pytest.raises(ValueError, match="must divide"):
        choose_spec(1_000, 64, "cosine", kind="ivf_pq", pq_m=7)


# floor of the recorded recall@10 per type on this data (nprobe 16 of 128 lists, efSearch 64,
# PQ with 8 bytes a vector)
FLOORS = {"flat": 1.0, "ivf_flat": 0.9, "ivf_pq": 0.6, "hnsw": 0.9}


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_pq", "hnsw"])
def test_search_matches_exact_within_the_recorded_recall(ray_local, data, kind):
    run_dir, database, queries, ids = data
    overrides = {"index.type": kind, "index.nlist": 128, "index.recall_sample": 300}
    if kind == "ivf_pq":
        overrides["index.pq_m"] = 8  # 8 bytes a vector (4 dims per sub-quantizer)
    record = run_index(_cfg(run_dir, **overrides))
    assert record["status"] == "done" and record["type"] == kind and record["count"] == N
    assert {p.name for p in (run_dir / "index").iterdir()} == {
        "index.faiss",
        "ids.parquet",
        "meta.json",
    }
    meta = json.loads((run_dir / "index" / "meta.json").read_text())
    documented = meta["recall_at_10"]
    assert documented >= FLOORS[kind]
    index = SearchIndex(str(run_dir), device="cpu")
    hits = index.search_vectors(queries, 10)
    truth_rows, truth_sims = _exact_top10(database, queries)
    found = np.array([[h.image_id for h in row] for row in hits])
    recall = np.mean(
        [len(np.intersect1d(f, ids[t])) / 10 for f, t in zip(found, truth_rows, strict=True)]
    )
    assert recall >= documented - 0.05, (recall, documented)
    assert all(h.uri == f"file:///synthetic/img-{np.flatnonzero(ids == h.image_id)[0]:07d}.jpg"
               for h in hits[0])  # fmt: skip
    sims = np.array([[h.similarity for h in row] for row in hits])
    assert (np.diff(sims, axis=1) <= 1e-5).all()
    if kind == "flat":
        assert recall == 1.0
        np.testing.assert_allclose(sims, truth_sims, atol=1e-5)
    else:
        # Reported similarities are true cosines of the hits (PQ: approximately).
        tol = 0.1 if kind == "ivf_pq" else 1e-4
        np.testing.assert_allclose(sims[:, 0], truth_sims[:, 0], atol=tol)
    # A query by image_id finds that image first (PQ: among the first few).
    first = index.search_ids([int(i) for i in ids[:5]], 5)
    for image_id, row in zip(ids[:5], first, strict=True):
        got = [h.image_id for h in row]
        assert int(image_id) in (got if kind == "ivf_pq" else got[:1])


def test_budget_no_index_fits_stops_before_writing(ray_local, data, tmp_path, capsys):
    run_dir, *_ = data
    work = tmp_path / "run"
    shutil.copytree(run_dir, work, ignore=shutil.ignore_patterns("index"))
    before = (work / "run.json").read_text()
    code = main(["index", "--run-dir", str(work), "--index-memory", "16KB"])
    assert code == 2
    assert "no index type fits 20000 vectors of dimension 32" in capsys.readouterr().err
    assert not (work / "index").exists()
    assert (work / "run.json").read_text() == before  # not even a "running" record
    # A budget under flat, HNSW and IVF-Flat but over IVF-PQ picks IVF-PQ, and stays within it.
    overrides = {
        "index.memory": "0.6MB",
        "index.nlist": 64,
        "index.train_points_per_list": 39,
        "index.recall_sample": 0,
    }
    record = run_index(_cfg(work, **overrides))
    assert record["type"] == "ivf_pq" and record["spec"]["pq_m"] == 8  # 16 would not fit
    assert record["memory_estimate_bytes"] <= int(0.6 * (1 << 20)) == record["memory_budget_bytes"]
    assert record["build"]["train_rows"] == 256 * 39  # PQ's floor: 39 rows per code
    assert record["recall_at_10"] is None and record["recall_queries"] == 0


def test_search_by_image_id_on_the_cli_and_refusals(ray_local, data, tmp_path, capsys):
    run_dir, _, _, ids = data
    work = tmp_path / "run"
    shutil.copytree(run_dir, work, ignore=shutil.ignore_patterns("index"))
    run_index(_cfg(work, **{"index.type": "flat"}))
    shutil.rmtree(work / "embeddings")  # search needs index/ alone
    capsys.readouterr()
    code = main(["search", "--run-dir", str(work), "--image-id", str(ids[7]), "-k", "3", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["query"] == f"image_id:{ids[7]}"
    assert out[0]["results"][0]["uri"] == "file:///synthetic/img-0000007.jpg"
    assert out[0]["results"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert len(out[0]["results"]) == 3
    assert main(["search", "--run-dir", str(work), "--image-id", "12345"]) == 2
    assert "image_id 12345 is not in this run's index" in capsys.readouterr().err
    assert main(["search", "--run-dir", str(work)]) == 2
    assert "search needs a query" in capsys.readouterr().err
    args = ["search", "--run-dir", str(work), "--image-id", "1", "--backbone", "resnet50"]
    assert main(args) == 2
    assert "holds efficientnet_lite0 embeddings, not resnet50" in capsys.readouterr().err
    # The run's embeddings were redone with another backbone: the index no longer matches.
    info = json.loads((work / "run.json").read_text())
    info["stages"]["embed"]["embedder"]["backbone"] = "resnet50"
    (work / "run.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="built from efficientnet_lite0 embeddings"):
        SearchIndex(str(work))


def test_stages_and_search_on_object_storage(ray_local, s3_bucket):
    """cluster, graph and index read and write an s3:// run directory; search loads from it."""
    from semclust import storage
    from semclust.clustering.kmeans import run_cluster
    from semclust.clustering.knn import run_graph

    run_dir = f"s3://{s3_bucket}/run"
    x, _, _ = planted(3_000, 5, 16, noise=0.3, seed=8)
    ids = write_run(run_dir, x, rows_per_part=1_000)
    cfg = _cfg(run_dir, **{"cluster.k": 5, "graph.k": 5, "index.type": "hnsw"})
    assert run_cluster(cfg)["rows"] == 3_000
    assert run_graph(cfg)["rows"] == 3_000
    record = run_index(cfg)
    assert record["type"] == "hnsw" and record["recall_at_10"] >= 0.9
    for folder in ("assignments", "knn"):
        assert len(storage.list_shards(f"{run_dir}/{folder}")) == 3
    assert storage.exists(f"{run_dir}/model/kmeans.json")
    assert storage.exists(f"{run_dir}/duplicates/part-00000.parquet")
    hits = SearchIndex(run_dir).search_ids([int(ids[42])], 3)[0]
    assert hits[0].image_id == int(ids[42]) and hits[0].uri.endswith("img-0000042.jpg")
