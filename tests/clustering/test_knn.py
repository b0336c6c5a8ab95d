"""The graph's pieces: dropping the query itself from its results, the method by N, the index
spec of each method, and a searcher actor's answers (run in this process)."""

from __future__ import annotations

import numpy as np

from semclust.clustering.knn import GraphSearcher, choose_method, drop_self, graph_spec
from semclust.config import GraphConfig
from semclust.rundir.embeddings import embedding_shards
from semclust.rundir.tables import read_knn_part
from tests.clustering.synthetic import brute_force_knn, planted, write_run


def test_drop_self_and_method_choice():
    labels = np.array([[1, 2, 3], [9, 4, 5], [6, 7, 8]])
    scores = np.arange(9, dtype=np.float32).reshape(3, 3)
    kept, kept_scores = drop_self(np.array([1, 4, 99]), labels, scores, 2)
    assert kept.tolist() == [[2, 3], [9, 5], [6, 7]]
    assert kept_scores.tolist() == [[1, 2], [3, 5], [6, 7]]
    assert choose_method(GraphConfig(), 40_000, gpu=False) == "exact"
    assert choose_method(GraphConfig(), 100_000, gpu=False) == "ivf"
    assert choose_method(GraphConfig(), 1_000_000, gpu=False) == "ivf"
    assert choose_method(GraphConfig(), 1_000_000, gpu=True) == "exact"
    assert choose_method(GraphConfig(method="hnsw"), 10, gpu=False) == "hnsw"


def test_graph_spec_per_method():
    gc = GraphConfig(nlist=None, hnsw_m=16, ef_construction=40)
    assert graph_spec(gc, "exact", 1_000, 8).factory == "Flat"
    assert graph_spec(gc, "hnsw", 1_000, 8).factory == "HNSW16,Flat"
    assert graph_spec(gc, "ivf", 1_000_000, 8).factory == "IVF4096,Flat"  # about 4 sqrt(N)
    assert graph_spec(GraphConfig(nlist=500), "ivf", 100, 8).nlist == 100  # never over N


def test_exact_searcher_writes_a_part_equal_to_brute_force(tmp_path):
    x, _, _ = planted(1_500, 6, 16, noise=0.5, seed=2)
    ids = write_run(tmp_path, x, rows_per_part=500)
    shards = embedding_shards(str(tmp_path))
    gc = GraphConfig(k=4, method="exact", device="cpu")
    searcher = GraphSearcher(shards, graph_spec(gc, "exact", 1_500, 16), None, gc, 1)
    out = str(tmp_path / "knn" / "part-00001.parquet")
    assert searcher.graph_shard(shards.uris[1], out, 4, batch=128) == 500
    part = read_knn_part(out)
    np.testing.assert_array_equal(part.ids, ids[500:1_000])
    truth = ids[brute_force_knn(x, 4, np.arange(500, 1_000))]
    assert (part.neighbors == truth).mean() > 0.99  # ties aside
    assert (np.diff(part.similarities, axis=1) <= 1e-6).all()
