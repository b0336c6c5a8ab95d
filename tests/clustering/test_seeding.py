"""The seeder table: every ``cluster.init`` has one, each returns k rows of the data, seeded;
k-means++ puts one seed in each well-separated cluster."""

from __future__ import annotations

import numpy as np
import pytest

from semclust.clustering import seeding
from semclust.clustering.seeding import SEEDERS, greedy_kmeanspp, kmeanspp_seeds, random_seeds
from semclust.config import CLUSTER_INITS
from tests.clustering.synthetic import planted


def _is_row_of(seeds: np.ndarray, x: np.ndarray) -> np.ndarray:
    """For each seed, whether it equals some row of x."""
    d = ((seeds[:, None, :] - x[None]) ** 2).sum(-1)
    return d.min(axis=1) < 1e-10


def test_every_init_of_the_config_has_a_seeder():
    assert set(SEEDERS) == set(CLUSTER_INITS)


@pytest.mark.parametrize("init", sorted(SEEDERS))
def test_a_seeder_returns_k_distinct_rows_and_repeats_with_its_seed(init):
    x, _, _ = planted(2_000, 10, 8, noise=0.5, seed=1)
    seeds = SEEDERS[init](x, 10, 3, 0)
    assert seeds.shape == (10, 8) and seeds.dtype == np.float32
    assert _is_row_of(seeds, x).all()
    assert len(np.unique(seeds, axis=0)) == 10
    np.testing.assert_array_equal(SEEDERS[init](x, 10, 3, 0), seeds)
    assert not np.array_equal(SEEDERS[init](x, 10, 4, 0), seeds)


def test_greedy_kmeanspp_puts_one_seed_in_each_cluster():
    x, _, centres = planted(5_000, 6, 16, noise=0.2, seed=3)
    seeds = greedy_kmeanspp(x, 6, seed=0)
    # One seed per planted cluster: each centre's nearest seed is a different one.
    nearest = np.argmin(((centres[:, None] - seeds[None]) ** 2).sum(-1), axis=1)
    assert len(set(nearest.tolist())) == 6


def test_greedy_kmeanspp_with_fewer_distinct_rows_than_seeds():
    x = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)  # 3 distinct rows, 12 in all
    seeds = greedy_kmeanspp(x, 5, seed=0)
    assert seeds.shape == (5, 3)
    assert len(np.unique(seeds, axis=0)) == 3  # each distinct row first, then any rows


def test_kmeanspp_is_greedy_on_a_subsample_up_to_its_limit(monkeypatch):
    x, _, centres = planted(20_000, 6, 16, noise=0.2, seed=5)
    seeds = kmeanspp_seeds(x, 6, seed=2)
    nearest = np.argmin(((centres[:, None] - seeds[None]) ** 2).sum(-1), axis=1)
    assert len(set(nearest.tolist())) == 6
    # The greedy draw saw 32 rows per centroid: the same seeds as greedy on that subsample.
    rows = np.sort(np.random.default_rng(2).permutation(len(x))[: 32 * 6])
    np.testing.assert_array_equal(seeds, greedy_kmeanspp(x[rows], 6, 2))
    # Above the limit FAISS's own k-means++ seeds every row.
    monkeypatch.setattr(seeding, "_GREEDY_MAX_K", 4)
    faiss_seeds = kmeanspp_seeds(x, 6, seed=2)
    np.testing.assert_array_equal(faiss_seeds, seeding.faiss_seeds(x, 6, 2, "KMEANS_PLUS_PLUS"))
    assert _is_row_of(faiss_seeds, x).all()


def test_random_seeds_are_what_faiss_starts_from():
    import faiss

    x, _, _ = planted(3_000, 4, 8, noise=0.5, seed=7)
    km = faiss.Kmeans(8, 4, niter=0, seed=9, max_points_per_centroid=1_000)
    km.train(x)
    np.testing.assert_array_equal(random_seeds(x, 4, 9), km.centroids)
