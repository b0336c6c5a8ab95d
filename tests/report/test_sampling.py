"""Shard-by-shard selection: the same answer as a global selection, whatever the sharding."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from semclust import storage
from semclust.report.collect import nearest_clusters, summarize_assignments
from semclust.report.sampling import hash_key, key_threshold, smallest_per_group
from tests.report.helpers import unit_vectors


def _remote(run_dir) -> object:
    """Ray tasks as the report stage makes them (``RunContext.remote``)."""
    from semclust.config import RunConfig
    from semclust.context import RunContext

    return RunContext(RunConfig(run_dir=str(run_dir))).remote


def test_smallest_per_group_matches_brute_force_and_ignores_row_order():
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 9, size=500)
    values = rng.integers(0, 40, size=500).astype(np.float64)  # many ties
    ids = rng.permutation(10_000)[:500]
    picked = smallest_per_group(groups, values, 4, ids)
    expected = []
    for g in range(9):
        members = [i for i in range(500) if groups[i] == g]
        expected += sorted(members, key=lambda i: (values[i], ids[i]))[:4]
    assert picked.tolist() == expected
    shuffle = rng.permutation(500)
    again = smallest_per_group(groups[shuffle], values[shuffle], 4, ids[shuffle])
    assert sorted(ids[shuffle][again].tolist()) == sorted(ids[picked].tolist())
    assert smallest_per_group(groups, values, 0).size == 0
    assert smallest_per_group(groups[:0], values[:0], 3).size == 0


def test_hash_key_is_seeded_stable_and_uniform():
    ids = np.arange(200_000, dtype=np.int64) * 7919
    a, b = hash_key(ids, 1), hash_key(ids, 1)
    assert a.dtype == np.uint64 and (a == b).all()
    assert (a != hash_key(ids, 2)).mean() > 0.999
    for fraction in (0.01, 0.25, 0.5):
        assert abs((a <= key_threshold(fraction)).mean() - fraction) < 0.01
    assert (a <= key_threshold(1.0)).all()


def _write_assignments(run_dir, ids, clusters, dist, parts: int, seed: int) -> None:
    order = np.random.default_rng(seed).permutation(len(ids))
    for n, rows in enumerate(np.array_split(order, parts)):
        table = pa.table(
            {
                "image_id": pa.array(ids[rows], pa.int64()),
                "cluster": pa.array(clusters[rows].astype(np.int32)),
                "distance": pa.array(dist[rows].astype(np.float32)),
            }
        )
        storage.write_parquet(str(run_dir / "assignments" / f"part-{n:05d}.parquet"), table)


def test_summaries_equal_a_global_selection_for_any_sharding(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    n, k = 3000, 7
    ids = rng.choice(2**62, size=n, replace=False).astype(np.int64)
    clusters = rng.choice(k - 1, size=n, p=np.r_[0.5, np.full(k - 2, 0.5 / (k - 2))])
    clusters[clusters == 3] = 2  # cluster 3 is small (only row 0), cluster 6 empty
    clusters[0] = 3
    dist = rng.random(n).astype(np.float32)

    results = []
    for parts, seed in ((1, 0), (5, 1)):
        run = tmp_path / f"run{parts}"
        _write_assignments(run, ids, clusters, dist, parts, seed)
        results.append(summarize_assignments(str(run), k, 5, 4, 300, 11, remote=_remote(run)))
    one, five = results
    for c in range(k):
        assert [m.image_id for m in one.nearest[c]] == [m.image_id for m in five.nearest[c]]
        assert [m.image_id for m in one.sample[c]] == [m.image_id for m in five.sample[c]]
    assert one.map_ids.tolist() == five.map_ids.tolist()

    np.testing.assert_array_equal(one.counts, np.bincount(clusters, minlength=k))
    np.testing.assert_allclose(
        one.dist_sum, np.bincount(clusters, weights=dist.astype(np.float64), minlength=k)
    )
    assert one.rows == n
    for c in range(k):
        members = np.flatnonzero(clusters == c)
        ranked = sorted(members, key=lambda i: (float(dist[i]), ids[i]))
        assert [m.image_id for m in one.nearest[c]] == ids[ranked[:5]].tolist()
        assert [m.distance for m in one.nearest[c]] == pytest.approx(dist[ranked[:5]].tolist())
        sample = {m.image_id for m in one.sample[c]}
        assert len(sample) == min(4, max(0, len(members) - 5))
        assert sample <= set(ids[members].tolist())
        assert not sample & {m.image_id for m in one.nearest[c]}
    assert one.nearest[6] == [] and one.sample[6] == []

    assert len(one.map_ids) == 300 and len(set(one.map_ids.tolist())) == 300
    cluster_of = dict(zip(ids.tolist(), clusters.tolist(), strict=True))
    assert [cluster_of[i] for i in one.map_ids.tolist()] == one.map_clusters.tolist()
    # A seeded uniform sample: about half of it from cluster 0, which holds about half the rows.
    assert 0.4 < (one.map_clusters == 0).mean() < 0.6
    run1 = tmp_path / "run1"
    other = summarize_assignments(str(run1), k, 5, 4, 300, 12, remote=_remote(run1))
    assert set(other.map_ids.tolist()) != set(one.map_ids.tolist())


def test_stale_assignments_are_refused(ray_local, tmp_path):
    ids = np.arange(10, dtype=np.int64)
    _write_assignments(tmp_path, ids, np.full(10, 9), np.zeros(10), 1, 0)
    with pytest.raises(Exception, match=r"outside 0\.\.4"):
        summarize_assignments(str(tmp_path), 5, 2, 2, 10, 0, remote=_remote(tmp_path))


def test_nearest_clusters_by_centroid_cosine_in_chunks():
    centroids = unit_vectors(50, 16, seed=5) * np.random.default_rng(1).uniform(0.5, 2, (50, 1))
    got = nearest_clusters(centroids.astype(np.float32), 3, chunk=7)
    unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    for c in range(50):
        assert [n for n, _ in got[c]] == np.argsort(-sims[c], kind="stable")[:3].tolist()
        assert [s for _, s in got[c]] == pytest.approx(np.sort(sims[c])[::-1][:3].tolist(), 1e-5)
    assert nearest_clusters(centroids[:1].astype(np.float32), 3) == [[]]
