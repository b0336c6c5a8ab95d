"""The graph's pieces: dropping the query itself from its results, the method by N, the index
spec of each method, batches, and a searcher actor's answers (run in this process): exact,
bucketed IVF against plain IVF, and the depth tuning."""

from __future__ import annotations

import faiss
import numpy as np

from semclust.clustering.knn import (
    GraphSearcher,
    batch_groups,
    build_graph_index,
    choose_method,
    drop_self,
    graph_nlist,
    graph_spec,
)
from semclust.config import GraphConfig
from semclust.index.exact import recall_at_k
from semclust.index.factory import depth_steps
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
    # A power of two near sqrt(N): 1,000 lists at 10^6, 3,162 at 10^7 (rounded in log2).
    assert graph_spec(gc, "ivf", 1_000_000, 8).factory == "IVF1024,Flat"
    assert [graph_nlist(n) for n in (100_000, 1_600_000, 10_000_000)] == [256, 1024, 4096]
    assert graph_nlist(1_000) == 25  # at least 39 training rows per list
    assert graph_spec(GraphConfig(nlist=500), "ivf", 100, 8).nlist == 100  # never over N
    ivf = graph_spec(GraphConfig(nlist=100), "ivf", 10_000, 8)
    assert depth_steps(ivf) == [1, 2, 4, 8, 16, 32, 64, 100]  # every list last
    assert depth_steps(graph_spec(GraphConfig(nlist=64), "ivf", 10_000, 8))[-1] == 64
    assert depth_steps(graph_spec(gc, "hnsw", 1_000, 8)) == [
        16,
        32,
        64,
        128,
        256,
        512,
        1024,
        2048,
        4096,
    ]


def test_batch_groups_keep_order_cap_rows_and_feed_every_actor():
    uris = [f"s{i}" for i in range(6)]
    # Capped by rows: shards in order, never split, a big one alone.
    assert batch_groups(uris, [3, 3, 3, 9, 1, 1], 6, 1) == [
        ["s0", "s1"],
        ["s2"],
        ["s3"],
        ["s4", "s5"],
    ]
    # Fewer batches than actors would leave actors idle: 4 actors, 4 batches.
    assert batch_groups(uris[:4], [5, 5, 5, 5], 100, 4) == [["s0"], ["s1"], ["s2"], ["s3"]]
    assert batch_groups(uris[:4], [5, 5, 5, 5], 100, 2) == [["s0", "s1"], ["s2", "s3"]]


def test_exact_searcher_writes_a_part_equal_to_brute_force(tmp_path):
    x, _, _ = planted(1_500, 6, 16, noise=0.5, seed=2)
    ids = write_run(tmp_path, x, rows_per_part=500)
    shards = embedding_shards(str(tmp_path))
    gc = GraphConfig(k=4, method="exact", device="cpu")
    searcher = GraphSearcher(shards, graph_spec(gc, "exact", 1_500, 16), None, gc, 1)
    outs = [str(tmp_path / "knn" / f"part-{i:05d}.parquet") for i in (1, 2)]
    assert searcher.graph_batch(shards.uris[1:], outs, 4) == 1_000
    for out, start in zip(outs, (500, 1_000), strict=True):
        part = read_knn_part(out)  # one part per shard of the batch, its own rows
        np.testing.assert_array_equal(part.ids, ids[start : start + 500])
        truth = ids[brute_force_knn(x, 4, np.arange(start, start + 500))]
        assert (part.neighbors == truth).mean() > 0.99  # ties aside
        assert (np.diff(part.similarities, axis=1) <= 1e-6).all()


def _ivf_searchers(tmp_path, gc):
    x, _, _ = planted(12_000, 40, 32, noise=1.5, seed=7)
    ids = write_run(tmp_path, x, rows_per_part=3_000)
    shards = embedding_shards(str(tmp_path))
    spec = graph_spec(gc, "ivf", shards.total, 32)
    index_uri = str(tmp_path / "knn" / ".graph-index" / "index.faiss")
    build_graph_index(shards, spec, gc, index_uri, seed=3)
    bucketed = GraphSearcher(shards, spec, index_uri, gc, 2)
    plain = GraphSearcher(
        shards, spec, index_uri, GraphConfig(**{**vars(gc), "bucketed": False}), 2
    )
    return x, ids, bucketed, plain


def test_bucketed_search_equals_plain_search(tmp_path):
    gc = GraphConfig(k=10, method="ivf", nlist=64, device="cpu")
    x, ids, bucketed, plain = _ivf_searchers(tmp_path, gc)
    assert bucketed.bucketed and not plain.bucketed
    for depth in (1, 4):
        bucketed.set_depth(depth)
        plain.set_depth(depth)
        before = faiss.cvar.distance_compute_blas_threshold
        got_ids, got_sims = bucketed.search(x, 11)
        # Its scans went through BLAS; other searches keep FAISS's own threshold.
        assert faiss.cvar.distance_compute_blas_threshold == before
        want_ids, want_sims = plain.search(x, 11)
        np.testing.assert_allclose(got_sims, want_sims, atol=1e-5)
        assert (got_ids == want_ids).mean() > 0.999  # equal similarities may swap places
    # Whole shards: the bucketed searcher reuses the build's coarse search of their rows.
    assert bucketed.lists is not None and bucketed.lists.shape == (len(x), 16)
    outs = {}
    for name, searcher in (("bucketed", bucketed), ("plain", plain)):
        uris = embedding_shards(str(tmp_path)).uris[1:3]
        outs[name] = [str(tmp_path / name / f"part-{i}.parquet") for i in (1, 2)]
        assert searcher.graph_batch(uris, outs[name], 10) == 6_000
    for got, want in zip(outs["bucketed"], outs["plain"], strict=True):
        got, want = read_knn_part(got), read_knn_part(want)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.similarities, want.similarities, atol=1e-5)
        assert (got.neighbors == want.neighbors).mean() > 0.999
    # nprobe 4 of 64 lists misses neighbours that nprobe 1 would not find either: a real IVF.
    truth = ids[brute_force_knn(x, 10, np.arange(500))]
    found = drop_self(ids[:500], got_ids[:500], got_sims[:500], 10)[0]
    assert 0.5 < recall_at_k(found, truth) < 1.0


def test_tuning_picks_the_smallest_depth_that_reaches_the_target(tmp_path):
    gc = GraphConfig(k=10, method="ivf", nlist=64, device="cpu")
    x, ids, searcher, _ = _ivf_searchers(tmp_path, gc)
    rng = np.random.default_rng(11)
    rows = np.sort(rng.choice(len(x), 300, replace=False))
    truth = ids[brute_force_knn(x, 10, rows)]
    tuned = searcher.tune(ids[rows], x[rows], truth, 10, 0.97)
    depths = [d for d, _ in tuned["tried"]]
    recalls = [r for _, r in tuned["tried"]]
    assert depths == [2**i for i in range(len(depths))]  # 1, 2, 4, ... in order
    assert tuned["value"] == depths[-1] == searcher.depth and tuned["recall"] == recalls[-1]
    assert recalls[-1] >= 0.97 and all(r < 0.97 for r in recalls[:-1])
    assert len(depths) >= 3  # these data need more than one or two lists per query
    assert recalls == sorted(recalls)
    # An unreachable target ends at every list, exact: recall 1.
    everything = searcher.tune(ids[rows], x[rows], truth, 10, 1.01)
    assert everything["value"] == 64 and everything["recall"] > 0.999
