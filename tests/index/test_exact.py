"""Exact top-k over shards (the ground truth of recall checks): per shard, merged, in Ray, and
recall@k."""

from __future__ import annotations

import numpy as np

from semclust.config import load_config
from semclust.context import RunContext
from semclust.index.exact import exact_topk, merge_topk, recall_at_k, shard_topk
from semclust.rundir.embeddings import embedding_shards
from tests.clustering.synthetic import brute_force_knn, planted, write_run


def test_shard_topk_and_merge_equal_brute_force(tmp_path):
    x, _, _ = planted(1_200, 5, 8, noise=0.6, seed=3)
    ids = write_run(tmp_path, x, rows_per_part=500)  # parts of 500, 500 and 200 rows
    shards = embedding_shards(str(tmp_path))
    queries = x[:20]
    parts = [shard_topk(u, queries, 6, "cosine") for u in shards.uris]
    found, sims = merge_topk(parts, 6)
    truth = brute_force_knn(x, 6, np.arange(20), exclude_self=False)
    np.testing.assert_array_equal(found, ids[truth])
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)  # each query is a row: itself first
    # A shard smaller than k pads with id -1 and -inf.
    small_ids, small_sims = shard_topk(shards.uris[2], queries, 300, "l2")
    assert (small_ids[:, 200:] == -1).all() and np.isneginf(small_sims[:, 200:]).all()
    assert (small_sims[:, :200] <= 0).all()  # minus squared L2


def test_exact_topk_in_ray_tasks(ray_local, tmp_path):
    x, _, _ = planted(900, 4, 8, noise=0.6, seed=5)
    ids = write_run(tmp_path, x, rows_per_part=300)
    ctx = RunContext(load_config(None, {"run_dir": str(tmp_path)}))
    shards = embedding_shards(str(tmp_path))
    found, _ = exact_topk(ctx, shards.uris, x[100:110], 4, "cosine")
    truth = brute_force_knn(x, 4, np.arange(100, 110), exclude_self=False)
    np.testing.assert_array_equal(found, ids[truth])


def test_recall_at_k():
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    found = np.array([[3, 2, 9], [-1, -1, -1]])
    assert recall_at_k(found, truth) == 2 / 6
    assert recall_at_k(truth, truth) == 1.0
    assert recall_at_k(np.empty((0, 3), int), np.empty((0, 3), int)) == 1.0
