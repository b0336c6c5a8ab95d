"""The pieces of `semclust add` on planted data, without Ray: the kNN update, the drift
measure and near-duplicate group ids that survive growth."""

from __future__ import annotations

import numpy as np
import pytest

from semclust import storage
from semclust.clustering.duplicates import duplicate_groups, keep_group_ids
from semclust.grow.drift import measure_drift
from semclust.grow.graph import merge_lists, update_group
from semclust.rundir.embeddings import read_embeddings
from semclust.rundir.tables import knn_table, read_knn_part
from tests.clustering.synthetic import write_run


def _exact(x: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn @ xn.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(sims, order, axis=1).astype(np.float32)


def test_update_group_turns_an_old_graph_into_the_graph_of_all_rows(tmp_path):
    rng = np.random.default_rng(7)
    k, old_n, new_n, dim = 6, 300, 120, 16
    x = rng.normal(size=(old_n + new_n, dim)).astype(np.float32)
    run = tmp_path / "run"
    old_ids = write_run(run, x[:old_n], rows_per_part=100)
    new_ids = write_run(run, x[old_n:], rows_per_part=60, first_part=3, prefix="new")
    shards = storage.list_shards(str(run / "embeddings"))
    assert len(shards) == 5
    ids = np.concatenate([old_ids, new_ids])
    # The old graph: exact among the old rows only, one knn/ part per old shard.
    nb, sims = _exact(x[:old_n], old_ids, k)
    knn = [str(run / "knn" / s.rsplit("/", 1)[-1]) for s in shards]
    for part, uri in enumerate(knn[:3]):
        rows = slice(100 * part, 100 * (part + 1))
        storage.write_parquet(uri, knn_table(old_ids[rows], nb[rows], sims[rows]))
    added = np.concatenate([read_embeddings(s)[1] for s in shards[3:]])
    added /= np.linalg.norm(added, axis=1, keepdims=True)
    found, found_sims, changed = update_group(
        shards, [True, True, True, False, False], knn, new_ids, added, k, "cosine", dim
    )
    truth, truth_sims = _exact(x, ids, k)
    # The added rows' lists and every old row's merged list are the full graph's.
    np.testing.assert_array_equal(found, truth[old_n:])
    np.testing.assert_allclose(found_sims, truth_sims[old_n:], atol=1e-5)
    grown = np.concatenate([read_knn_part(u).neighbors for u in knn[:3]])
    np.testing.assert_array_equal(grown, truth[:old_n])
    assert changed == int((truth[:old_n] != nb).any(axis=1).sum()) > 0
    # Again (a resumed add): the lists hold the added rows already, so nothing changes.
    again = update_group(
        shards, [True, True, True, False, False], knn, new_ids, added, k, "cosine", dim
    )
    assert again[2] == 0
    unchanged = np.concatenate([read_knn_part(u).neighbors for u in knn[:3]])
    np.testing.assert_array_equal(unchanged, grown)


def test_merge_lists_counts_an_id_once_and_keeps_short_lists_short():
    old_ids = np.array([[5, 7, -1]])
    old_sims = np.array([[0.9, 0.5, -np.inf]], dtype=np.float32)
    new_ids = np.array([[7, 9, 11]])
    new_sims = np.array([[0.5, 0.6, 0.1]], dtype=np.float32)
    ids, sims = merge_lists(old_ids, old_sims, new_ids, new_sims, 3)
    np.testing.assert_array_equal(ids, [[5, 9, 7]])
    np.testing.assert_allclose(sims, [[0.9, 0.6, 0.5]])
    ids, _ = merge_lists(old_ids, old_sims, np.array([[-1, -1, -1]]), np.full((1, 3), -np.inf), 3)
    np.testing.assert_array_equal(ids, [[5, 7, -1]])


def test_drift_counts_added_rows_beyond_each_clusters_own_quantile():
    rng = np.random.default_rng(3)
    k, n = 4, 40_000
    old_c = rng.integers(0, k, n)
    scale = np.array([1.0, 2.0, 3.0, 4.0])  # each cluster its own spread
    old_d = (rng.exponential(1.0, n) * scale[old_c]).astype(np.float32)
    same_c = rng.integers(0, k, 20_000)
    same_d = (rng.exponential(1.0, 20_000) * scale[same_c]).astype(np.float32)
    same = measure_drift((old_c, old_d), (same_c, same_d), k, 0.99, 50, 0.05)
    assert same["share_beyond"] == pytest.approx(0.01, abs=0.004)
    assert not same["drifted"] and same["advice"] is None
    # Cluster 0's added images at cluster 3's spread: far beyond cluster 0's own limit, though
    # within the run's overall one, so only per-cluster limits see it.
    far_c = np.zeros(2_000, dtype=np.int64)
    far_d = (rng.exponential(1.0, 2_000) * 4.0).astype(np.float32)
    far = measure_drift((old_c, old_d), (far_c, far_d), k, 0.99, 50, 0.05)
    assert far["share_beyond"] > 0.2 and far["drifted"]
    assert far["clusters"][0]["cluster"] == 0 and far["clusters_over_threshold"] == 1
    assert "re-cluster" in far["advice"]
    # A cluster with too few rows of its own takes the run's limit.
    tiny = measure_drift((old_c, old_d), (far_c, far_d), k, 0.99, n, 0.05)
    assert tiny["share_beyond"] < far["share_beyond"]


def test_group_ids_survive_growth():
    # Before: {10, 20} as group 10, {30, 40} as group 30.
    before = (np.array([10, 20, 30, 40]), np.array([10, 10, 30, 30]))
    # After adding 5 (joins 10's group), 35 (joins 30's group) and 1, 2 (a new group): the
    # smallest-id rule alone would rename group 10 to 5.
    src = np.array([10, 5, 30, 35, 1])
    dst = np.array([20, 10, 40, 30, 2])
    ids, groups = duplicate_groups(src, dst)
    kept_ids, kept = keep_group_ids(ids, groups, before)
    got = dict(zip(kept_ids.tolist(), kept.tolist(), strict=True))
    assert got == {1: 1, 2: 1, 5: 10, 10: 10, 20: 10, 30: 30, 35: 30, 40: 30}
    # Two old groups joined by an added image keep the smaller old id.
    ids, groups = duplicate_groups(np.array([10, 30, 25, 25]), np.array([20, 40, 10, 30]))
    _, kept = keep_group_ids(ids, groups, before)
    assert set(kept.tolist()) == {10}


def test_probe_group_compares_rows_within_probed_clusters(tmp_path):
    """Through the clusters: with every cluster probed it is the exact update; with 8 of 20 it
    keeps almost every exact neighbour of overlapping planted clusters, with one it does not."""
    from semclust.grow.graph import probe_group
    from semclust.rundir.tables import assignments_table

    rng = np.random.default_rng(11)
    k, clusters, dim, old_n, new_n = 8, 20, 32, 2000, 400
    centres = rng.normal(size=(clusters, dim))
    labels = rng.integers(0, clusters, old_n + new_n)
    x = (centres[labels] + 1.5 * rng.normal(size=(old_n + new_n, dim))).astype(np.float32)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cn = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
    ranked = np.argsort(-(xn @ cn.T), axis=1)
    run = tmp_path / "run"
    old_ids = write_run(run, x[:old_n], rows_per_part=500)
    new_ids = write_run(run, x[old_n:], rows_per_part=200, first_part=4, prefix="new")
    ids = np.concatenate([old_ids, new_ids])
    shards = storage.list_shards(str(run / "embeddings"))
    names = [s.rsplit("/", 1)[-1] for s in shards]
    start = 0
    for name, shard in zip(names, shards, strict=True):
        n = len(read_embeddings(shard)[0])
        two = ranked[start : start + n, :2]
        storage.write_parquet(
            str(run / "assignments" / name),
            assignments_table(ids[start : start + n], two, np.zeros((n, 2), np.float32)),
        )
        start += n
    truth, _ = _exact(x, ids, k)

    def grow(probes: int) -> tuple[np.ndarray, np.ndarray]:
        nb, sims = _exact(x[:old_n], old_ids, k)
        knn = [str(run / "knn" / n) for n in names]
        for part in range(4):
            rows = slice(500 * part, 500 * (part + 1))
            storage.write_parquet(knn[part], knn_table(old_ids[rows], nb[rows], sims[rows]))
        found, _, _ = probe_group(
            shards,
            [True] * 4 + [False] * 2,
            knn,
            [str(run / "assignments" / n) for n in names],
            new_ids,
            xn[old_n:],
            np.ascontiguousarray(ranked[old_n:, :probes]),
            clusters,
            k,
            "cosine",
            dim,
        )
        old = np.concatenate([read_knn_part(u).neighbors for u in knn[:4]])
        return found, old

    def recall(found: np.ndarray, true: np.ndarray) -> float:
        return float(
            np.mean([len(np.intersect1d(f, t)) / k for f, t in zip(found, true, strict=True)])
        )

    found, old = grow(clusters)
    np.testing.assert_array_equal(found, truth[old_n:])
    np.testing.assert_array_equal(old, truth[:old_n])
    # Overlapping clusters: one probed cluster misses many neighbours, 8 of 20 few.
    found, old = grow(8)
    assert recall(found, truth[old_n:]) >= 0.95 and recall(old, truth[:old_n]) >= 0.98
    found_one, _ = grow(1)
    assert recall(found_one, truth[old_n:]) < 0.8 < recall(found, truth[old_n:])


def test_the_add_config_is_the_runs_recorded_one(tmp_path):
    """The add takes the run's recorded sections (a key from another version left out), the
    command line's ray and add sections, and its storage only where it sets one."""
    from semclust import runinfo
    from semclust.config import RunConfig, load_config
    from semclust.grow.stage import run_config

    recorded = RunConfig().to_dict()
    recorded["cluster"]["k"] = 37
    recorded["embed"]["backbone"] = "efficientnet_lite1"
    recorded["embed"]["retired_option"] = 3
    recorded["storage"]["endpoint_url"] = "http://127.0.0.1:9"
    run = str(tmp_path / "run")
    runinfo.update_stage(run, "embed", {"status": "done"}, recorded)
    cli = load_config(None, {"run_dir": run, "ray.num_cpus": 2, "add.drift_threshold": 0.2})
    cfg = run_config(cli, "/new/images")
    assert cfg.cluster.k == 37 and cfg.embed.backbone == "efficientnet_lite1"
    assert cfg.embed.input == "/new/images" and cfg.mode == "resume"
    assert cfg.ray.num_cpus == 2 and cfg.add.drift_threshold == 0.2
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9"
    cli = load_config(None, {"run_dir": run, "storage.endpoint_url": "http://127.0.0.1:8"})
    assert run_config(cli, "/new").storage.endpoint_url == "http://127.0.0.1:8"
