"""The refine stage's pieces: the feature store (model-space rows, ids, graph neighbours as
store rows), renumbering to k-means, and writing a head's assignments."""

from __future__ import annotations

import os

import numpy as np
import pytest

from semclust import storage
from semclust.clustering.heads import HeadResult
from semclust.clustering.model import KMeansModel
from semclust.clustering.refine import FeatureStore, match_to, write_assignments
from semclust.config import RefineConfig
from semclust.rundir import tables
from semclust.rundir.embeddings import embedding_shards, read_clusters
from tests.clustering.synthetic import planted
from tests.label.runs import exact_knn, make_run


@pytest.fixture
def small_run(tmp_path):
    """900 rows around 3 planted centres in 3 parts, with a k=3 model and an exact 5-NN graph."""
    x, _, _ = planted(900, 3, 8, noise=0.3, seed=4)
    ids = make_run(tmp_path, x, 3, rows_per_part=400, knn_k=5)
    model, _ = KMeansModel.load(str(tmp_path))
    store = FeatureStore(embedding_shards(str(tmp_path)), model, workdir=str(tmp_path))
    yield tmp_path, x, ids, model, store
    store.close()


def test_feature_store_holds_model_space_rows_in_shard_order(small_run):
    _, x, ids, model, store = small_run
    assert len(store) == 900 and store.dim == 8
    np.testing.assert_array_equal(store.ids, ids)
    np.testing.assert_allclose(store.features, model.transform.apply(x), rtol=1e-6)
    spans = [(uri.rsplit("/", 1)[-1], rows) for uri, rows in store.shard_rows()]
    assert [(n, r.start, r.stop) for n, r in spans] == [
        ("part-00000.parquet", 0, 400),
        ("part-00001.parquet", 400, 800),
        ("part-00002.parquet", 800, 900),
    ]
    assert store.rows_of(np.array([ids[7], 12345, ids[899]])).tolist() == [7, -1, 899]
    folder = store.dir
    store.close()
    assert not os.path.exists(folder)  # close removes the memory-mapped file


def test_neighbour_rows_are_the_graph_as_store_rows(small_run):
    run_dir, x, _, _, store = small_run
    rows = store.neighbour_rows(str(run_dir), 3)
    expected, _ = exact_knn(x, 5)
    np.testing.assert_array_equal(rows, expected[:, :3])
    assert store.neighbour_rows(str(run_dir), 50).shape == (900, 5)  # at most the graph's k


def test_neighbours_missing_from_the_store_become_the_row_itself(small_run):
    run_dir, _, _, _, store = small_run
    uri = tables.knn_parts(str(run_dir))[0]
    part = tables.read_knn_part(uri)
    neighbors = part.neighbors.copy()
    neighbors[0, 0] = -1  # an approximate search found nothing
    neighbors[1, 1] = 424242  # a stale id
    storage.write_parquet(uri, tables.knn_table(part.ids, neighbors, part.similarities))
    rows = store.neighbour_rows(str(run_dir), 2)
    assert rows[0, 0] == 0 and rows[1, 1] == 1
    # A graph that misses rows is refused.
    storage.write_parquet(
        uri, tables.knn_table(part.ids[:10], neighbors[:10], part.similarities[:10])
    )
    with pytest.raises(ValueError, match="the kNN graph covers 510 of 900 embedded rows"):
        store.neighbour_rows(str(run_dir), 2)


def test_no_graph_is_refused(tmp_path):
    x, _, _ = planted(100, 2, 8, noise=0.3, seed=1)
    make_run(tmp_path, x, 2, rows_per_part=100, knn_k=3)
    store = FeatureStore(embedding_shards(str(tmp_path)), KMeansModel.load(str(tmp_path))[0])
    try:
        for part in (tmp_path / "knn").iterdir():
            part.unlink()
        with pytest.raises(ValueError, match=r"no kNN graph in .*: run `semclust graph` first"):
            store.neighbour_rows(str(tmp_path), 3)
    finally:
        store.close()


def test_match_to_renumbers_clusters_to_the_reference():
    reference = np.array([0, 0, 1, 1, 2, 2, -1])
    pred = np.array([2, 2, 0, 0, 1, 1, 1])
    mapping = match_to(reference, pred, 3)
    assert mapping[pred[:6]].tolist() == reference[:6].tolist()
    # A fourth predicted cluster without a partner keeps a free id.
    mapping = match_to(np.array([0, 0, 1, 1]), np.array([3, 3, 1, 2]), 4)
    assert sorted(mapping.tolist()) == [0, 1, 2, 3] and mapping[3] == 0 and mapping[1] == 1


def _head(model: KMeansModel, permutation: np.ndarray) -> HeadResult:
    """A head that gives p = 0.8 to a row's nearest centroid, with clusters renamed."""

    def predict(features: np.ndarray) -> np.ndarray:
        d = ((features[:, None] - model.centroids[None]) ** 2).sum(-1)
        probs = np.full((len(features), model.k), 0.1, dtype=np.float32)
        probs[np.arange(len(features)), permutation[np.argmin(d, axis=1)]] = 0.8
        return probs

    return HeadResult(predict=predict)


@pytest.mark.parametrize("renumber", [True, False])
def test_write_assignments_of_a_head(small_run, renumber):
    run_dir, _, ids, model, store = small_run
    kmeans = read_clusters(str(run_dir), "assignments", store)
    permutation = np.array([2, 0, 1])
    rc = RefineConfig(method="scan", confidence_threshold=0.75)
    out = write_assignments(str(run_dir), rc, store, _head(model, permutation), kmeans, renumber)
    table = tables.read_assignments(str(run_dir), "assignments_scan")
    np.testing.assert_array_equal(table["image_id"].to_numpy(), ids)
    clusters = table["cluster"].to_numpy()
    expected = kmeans if renumber else permutation[kmeans]
    np.testing.assert_array_equal(clusters, expected)
    np.testing.assert_allclose(table["distance"].to_numpy(), 0.2, rtol=1e-6)
    np.testing.assert_allclose(table["distance_2nd"].to_numpy(), 0.9, rtol=1e-6)
    assert out["output"] == "assignments_scan" and out["confident_fraction"] == 1.0
    assert out["agreement_with_kmeans"] == (1.0 if renumber else 0.0)
    sizes = np.bincount(kmeans, minlength=3)
    assert out["cluster_sizes"] == {"min": sizes.min(), "max": sizes.max(), "empty": 0}
    assert sorted(p.name for p in (run_dir / "assignments_scan").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
