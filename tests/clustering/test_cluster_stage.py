"""The cluster stage on seeded synthetic embeddings: planted clusters, Ray vs one process,
PCA/whitening, k=auto, resume, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import adjusted_rand_score

from semclust import runner
from semclust.cli import main
from semclust.clustering import cluster_stage
from semclust.clustering.kmeans import CentroidAssigner
from semclust.clustering.model import KMeansModel
from semclust.config import load_config
from semclust.rundir.tables import read_assignments
from tests.clustering.synthetic import planted, write_run

N, K, DIM = 200_000, 20, 32


def _cfg(run_dir, **overrides):
    return load_config(None, {"run_dir": str(run_dir), **overrides})


def run_cluster(cfg) -> dict:
    return runner.run_stages(cfg, ["cluster"])["cluster"]


def _labels_by_id(run_dir, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Assignment columns in the order of ``ids``."""
    table = read_assignments(str(run_dir))
    row_of = {int(i): r for r, i in enumerate(table["image_id"].to_pylist())}
    order = np.array([row_of[int(i)] for i in ids])
    return {c: table[c].to_numpy()[order] for c in table.column_names}


@pytest.fixture(scope="module")
def clustered(ray_local, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("kmeans") / "run"
    x, labels, _ = planted(N, K, DIM, noise=0.3, seed=11)
    ids = write_run(run_dir, x, rows_per_part=25_000)
    record = run_cluster(_cfg(run_dir, **{"cluster.k": K}))
    return run_dir, x, labels, ids, record


def test_kmeans_recovers_the_planted_clusters(clustered):
    run_dir, x, labels, ids, record = clustered
    got = _labels_by_id(run_dir, ids)
    assert adjusted_rand_score(labels, got["cluster"]) > 0.97
    assert record["status"] == "done" and record["k"] == K and record["rows"] == N
    # Trained on a sample of max_points_per_centroid * k rows, not on all of them.
    assert record["trained_on"] == 256 * K
    assert record["cluster_sizes"]["empty"] == 0
    names = sorted(p.name for p in (run_dir / "assignments").iterdir())
    assert names == sorted(p.name for p in (run_dir / "embeddings").iterdir())
    schema = pq.read_schema(run_dir / "assignments" / names[0])
    assert [str(schema.field(c).type) for c in schema.names] == [
        "int64",
        "int32",
        "float",
        "int32",
        "float",
    ]
    assert (got["cluster"] != got["cluster_2nd"]).all()
    assert (got["distance"] <= got["distance_2nd"] + 1e-6).all()
    # Spherical: the distance is the squared L2 between unit vectors, 2 - 2 cos.
    centroids = np.load(run_dir / "model" / "centroids.npy")
    xn = x[:100] / np.linalg.norm(x[:100], axis=1, keepdims=True)
    cos = (xn * centroids[got["cluster"][:100]]).sum(axis=1)
    np.testing.assert_allclose(got["distance"][:100], 2 - 2 * cos, atol=1e-4)
    summary = json.loads((run_dir / "model" / "kmeans.json").read_text())
    assert summary["k"] == K and summary["objective"] > 0 and not summary["pca"]
    info = json.loads((run_dir / "run.json").read_text())["stages"]["cluster"]
    assert info["status"] == "done" and info["rows"] == N
    sizes = record["cluster_sizes"]
    assert cluster_stage.summary(record) == f"k={K}, sizes {sizes}" and sizes["min"] > 0


def test_assignment_through_ray_equals_one_process(clustered):
    run_dir, x, _, ids, _ = clustered
    model, _ = KMeansModel.load(str(run_dir))
    labels, dist = CentroidAssigner(model).assign(x)
    got = _labels_by_id(run_dir, ids)
    np.testing.assert_array_equal(got["cluster"], labels[:, 0])
    np.testing.assert_array_equal(got["cluster_2nd"], labels[:, 1])
    np.testing.assert_allclose(got["distance"], dist[:, 0], atol=1e-6)
    np.testing.assert_allclose(got["distance_2nd"], dist[:, 1], atol=1e-6)


def test_resume_keeps_the_model_and_redoes_only_missing_shards(clustered, tmp_path):
    run_dir, _, _, ids, _ = clustered
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    before = _labels_by_id(work, ids)
    centroids = (work / "model" / "centroids.npy").read_bytes()
    (work / "assignments" / "part-00003.parquet").unlink()
    record = run_cluster(_cfg(work, **{"cluster.k": K}))
    assert record["assigned_this_run"] == 25_000
    assert (work / "model" / "centroids.npy").read_bytes() == centroids
    after = _labels_by_id(work, ids)
    np.testing.assert_array_equal(after["cluster"], before["cluster"])
    # Other settings: a new model, and every shard assigned again.
    record = run_cluster(_cfg(work, **{"cluster.k": K + 1}))
    assert record["k"] == K + 1 and record["assigned_this_run"] == N
    assert np.load(work / "model" / "centroids.npy").shape == (K + 1, DIM)


def test_pca_whitening_learned_on_the_sample_and_applied_in_the_actors(ray_local, tmp_path):
    x, labels, _ = planted(20_000, 8, 64, noise=0.4, seed=5)
    ids = write_run(tmp_path, x, rows_per_part=5_000)
    overrides = {"cluster.k": 8, "cluster.pca_dim": 12, "cluster.whiten": True}
    record = run_cluster(_cfg(tmp_path, **overrides))
    assert record["pca"] and record["whiten"] and record["model_dim"] == 12
    assert np.load(tmp_path / "model" / "centroids.npy").shape == (8, 12)
    assert (tmp_path / "model" / "pca.npz").is_file()
    got = _labels_by_id(tmp_path, ids)
    assert adjusted_rand_score(labels, got["cluster"]) > 0.95
    model, _ = KMeansModel.load(str(tmp_path))
    projected = model.transform.apply(x)
    assert projected.shape == (len(x), 12)
    np.testing.assert_allclose(np.linalg.norm(projected, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(CentroidAssigner(model).assign(x)[0][:, 0], got["cluster"])


def test_k_auto_finds_the_planted_k(ray_local, tmp_path, capsys):
    x, _, _ = planted(20_000, 7, 32, noise=0.5, seed=2)
    write_run(tmp_path, x, rows_per_part=10_000)
    code = main(["cluster", "--run-dir", str(tmp_path), "--k", "auto", "--k-max", "12"])
    assert code == 0, capsys.readouterr().err
    table = json.loads((tmp_path / "model" / "k_selection.json").read_text())
    assert table["chosen_k"] == 7
    assert [row["k"] for row in table["candidates"]] == list(range(2, 13))
    best = max(table["candidates"], key=lambda r: r["silhouette"])
    assert best["k"] == 7 and best["silhouette"] > 0.3
    info = json.loads((tmp_path / "run.json").read_text())["stages"]["cluster"]
    assert info["k"] == 7 and info["k_selection"]["chosen_k"] == 7
    assert np.load(tmp_path / "model" / "centroids.npy").shape == (7, 32)


@pytest.mark.parametrize(
    ("poison", "message"),
    [("nan", "contain NaN or inf"), ("zero", "are all zeros")],
)
def test_bad_vectors_stop_before_a_model_is_written(ray_local, tmp_path, poison, message):
    x, _, _ = planted(600, 3, 16, noise=0.3, seed=1)
    x[17] = np.nan if poison == "nan" else 0.0
    write_run(tmp_path, x, rows_per_part=300)
    with pytest.raises(ValueError, match=message):
        run_cluster(_cfg(tmp_path, **{"cluster.k": 3}))
    assert not (tmp_path / "model" / "kmeans.json").exists()
    info = json.loads((tmp_path / "run.json").read_text())["stages"]["cluster"]
    assert info["status"] == "failed" and message in info["error"]


def test_mixed_dimensions_and_k_over_n_stop_with_a_message(ray_local, tmp_path):
    x16, _, _ = planted(100, 2, 16, noise=0.3, seed=1)
    x32, _, _ = planted(100, 2, 32, noise=0.3, seed=1)
    write_run(tmp_path / "mixed", x16, rows_per_part=100)
    write_run(tmp_path / "mixed", x32, rows_per_part=100, first_part=1, prefix="other")
    with pytest.raises(ValueError, match="mixed dimensions: 16"):
        run_cluster(_cfg(tmp_path / "mixed", **{"cluster.k": 2}))
    write_run(tmp_path / "small", x16, rows_per_part=100)
    with pytest.raises(ValueError, match=r"cluster\.k=500 is larger than the 100 embedded images"):
        run_cluster(_cfg(tmp_path / "small", **{"cluster.k": 500}))
    assert not (tmp_path / "small" / "model").exists()
