"""k-means on arrays: restarts, the two-level variant, the allocation of centroids over coarse
clusters, and the nearest-centroid search, on seeded planted clusters."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from semclust.clustering.kmeans import (
    CentroidAssigner,
    allocate,
    assign,
    faiss_kmeans,
    train_kmeans,
    two_level_kmeans,
)
from semclust.clustering.model import KMeansModel, save_summary
from semclust.config import ClusterConfig
from semclust.index.faiss_ops import nearest_two
from tests.clustering.synthetic import planted


def _objective(x: np.ndarray, centroids: np.ndarray) -> float:
    d = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    return float(d.min(axis=1).sum())


def test_restarts_keep_the_lowest_objective():
    x, _, _ = planted(3_000, 8, 16, noise=0.9, seed=4)
    common = {"niter": 10, "spherical": False, "init": "kmeans++", "seed": 5}
    runs = [faiss_kmeans(x, 8, nredo=1, **{**common, "seed": 5 + r}) for r in range(4)]
    best = faiss_kmeans(x, 8, nredo=4, **common)
    objectives = [_objective(x, c) for c in runs]
    # Restart r is the single run with seed + r: the kept one is the best of those four.
    assert _objective(x, best) == pytest.approx(min(objectives), rel=1e-5)
    np.testing.assert_allclose(best, runs[int(np.argmin(objectives))], atol=1e-6)
    with pytest.raises(ValueError, match="cannot make 9 clusters of 8 rows"):
        faiss_kmeans(x[:8], 9, nredo=1, **common)


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_both_seeders_recover_well_separated_clusters(init):
    x, labels, _ = planted(4_000, 5, 16, noise=0.2, seed=6)
    centroids = faiss_kmeans(x, 5, niter=20, nredo=3, spherical=True, init=init, seed=0)
    got = assign(x, centroids, spherical=True)[0][:, 0]
    assert adjusted_rand_score(labels, got) > 0.99


def test_two_level_kmeans_for_many_clusters(tmp_path):
    x, labels, _ = planted(60_000, 300, 32, noise=0.15, seed=7)
    cc = ClusterConfig(k=300, hierarchical="on", max_points_per_centroid=200)
    model, summary = train_kmeans(x, cc)
    assert model.k == 300 and summary["coarse_k"] == round(300**0.5)
    assert model.coarse is not None and len(np.unique(model.parents)) == summary["coarse_k"]
    ivf = CentroidAssigner(model, nprobe=4)
    assert ivf.method.startswith("ivf")
    got = ivf.assign(x)[0][:, 0]
    assert adjusted_rand_score(labels, got) > 0.9
    flat = CentroidAssigner(KMeansModel(model.transform, model.centroids)).assign(x)[0][:, 0]
    assert (got == flat).mean() > 0.98  # the coarse shortcut rarely changes the answer
    # Rows bucketed by coarse cell (many rows) find exactly what the IVF finds row by row.
    z = model.transform.apply(x)
    labels2, dist2 = ivf.assign_model_space(z)
    plain_labels, plain_dist = nearest_two(ivf.index, z)
    np.testing.assert_array_equal(labels2, plain_labels)
    np.testing.assert_allclose(dist2, plain_dist, atol=1e-5)
    # Saved and loaded, the model keeps its coarse level (the actors load it so).
    model.save(str(tmp_path))
    save_summary(str(tmp_path), summary)
    loaded, _ = KMeansModel.load(str(tmp_path))
    again = CentroidAssigner(loaded, nprobe=4).assign(x[:500])[0][:, 0]
    np.testing.assert_array_equal(again, got[:500])


def test_two_level_parents_and_sizes():
    x, _, _ = planted(8_000, 40, 16, noise=0.3, seed=8)
    options = {"niter": 10, "nredo": 1, "spherical": True, "init": "kmeans++", "seed": 1}
    centroids, coarse, parents = two_level_kmeans(x, 36, **options)
    assert centroids.shape == (36, 16) and coarse.shape == (6, 16)  # sqrt(36) coarse clusters
    assert parents.dtype == np.int32 and set(parents.tolist()) <= set(range(6))
    # Each fine centroid lies nearer its own coarse centroid than most others do.
    d = ((centroids[:, None] - coarse[None]) ** 2).sum(-1)
    assert (np.argmin(d, axis=1) == parents).mean() > 0.9
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-4)


def test_allocation_over_coarse_clusters():
    alloc = allocate(10, np.array([5, 0, 100, 3]))
    assert alloc.sum() == 10 and alloc[1] == 0 and (alloc <= [5, 0, 100, 3]).all()
    assert alloc[2] == alloc.max()
    # Proportional with at least one each: 1:1:2 of 8 rows each is 2, 2, 4 of 8 centroids.
    assert allocate(8, np.array([8, 8, 16])).tolist() == [2, 2, 4]
    # Never more centroids than rows: a tiny cluster is capped and the rest go elsewhere.
    assert allocate(6, np.array([1, 50])).tolist() == [1, 5]


def test_assigner_returns_the_two_nearest_in_order():
    centroids = np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    x = np.array([[2, 0.1], [0.1, 3], [-1, -0.2]], dtype=np.float32)
    labels, dist = assign(x, centroids, spherical=False)
    assert labels.tolist() == [[0, 1], [1, 0], [2, 1]]
    np.testing.assert_allclose(dist[:, 0], [1.01, 4.01, 0.04], rtol=1e-5)
    assert (dist[:, 0] <= dist[:, 1]).all()


def test_a_two_level_model_on_a_gpu_searches_the_flat_gpu_index(monkeypatch):
    """On a GPU every centroid is searched flat (no IVF, no bucketing); no GPU here, so the GPU
    copy is stood in for by a CPU flat index, which has no nprobe either."""
    import faiss

    x, _, _ = planted(6_000, 36, 16, noise=0.2, seed=4)
    model, _ = train_kmeans(x, ClusterConfig(k=36, hierarchical="on", max_points_per_centroid=100))
    assert model.coarse is not None

    def cpu_copy(index, shard):
        copy = faiss.IndexFlatL2(index.d)
        copy.add(index.reconstruct_n(0, index.ntotal))
        return copy

    monkeypatch.setattr("semclust.clustering.kmeans.to_gpus", cpu_copy)
    on_gpu = CentroidAssigner(model, gpus=1)
    assert on_gpu.method == "flat (GPU)" and on_gpu.ivf is None
    got = on_gpu.assign(x)[0]
    flat = CentroidAssigner(KMeansModel(model.transform, model.centroids)).assign(x)[0]
    np.testing.assert_array_equal(got, flat)
