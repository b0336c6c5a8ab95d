"""Where k-means starts: one table of seeders, ``cluster.init`` -> function.

A seeder takes rows float32 (n, d), the number of centroids k, a seed and the GPUs FAISS may
use, and returns k starting centroids float32 (k, d). Arrays in, arrays out: no storage, no Ray.

- ``kmeans++``: greedy k-means++ (Arthur and Vassilvitskii, 2007; the greedy draw of 2 + ln k
  candidates per seed, as scikit-learn's) on ``_GREEDY_ROWS_PER_CENTROID`` rows per centroid, up to
  ``_GREEDY_MAX_K`` centroids; above that FAISS's own (non-greedy) k-means++, whose C++ loop is
  the one that stays fast there;
- ``random``: k distinct rows drawn uniformly (FAISS's random initialisation).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Seeder = Callable[[np.ndarray, int, int, int], np.ndarray]

_GREEDY_MAX_K = 1024  # above this, FAISS's own k-means++ seeds instead
_GREEDY_ROWS_PER_CENTROID = 32  # the greedy draw looks at this many rows per centroid


def greedy_kmeanspp(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy k-means++ seeds: float32 (k, d) rows of ``x`` float32 (n, d).

    Each new seed is the best (lowest total squared distance) of ``2 + ln k`` candidates drawn
    with probability proportional to the squared distance to the nearest seed so far. Plain
    k-means++ draws one candidate; on well-separated data it often puts two seeds in one cluster
    and k-means cannot move them apart, the greedy draw rarely does.
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    trials = 2 + int(math.log(k))
    sq = np.einsum("ij,ij->i", x, x)
    chosen = [int(rng.integers(n))]
    closest = np.maximum(sq + sq[chosen[0]] - 2.0 * (x @ x[chosen[0]]), 0.0)
    potential = float(closest.sum(dtype=np.float64))
    for _ in range(1, k):
        if potential <= 0:  # every row is already a seed's duplicate: any rows will do
            rest = np.setdiff1d(np.arange(n), chosen)[: k - len(chosen)]
            chosen.extend(int(i) for i in rest)
            break
        draws = rng.random(trials) * potential
        candidates = np.minimum(np.searchsorted(np.cumsum(closest, dtype=np.float64), draws), n - 1)
        dist = sq[candidates][:, None] + sq[None, :] - 2.0 * (x[candidates] @ x.T)
        np.maximum(dist, 0.0, out=dist)
        np.minimum(dist, closest[None, :], out=dist)
        potentials = dist.sum(axis=1, dtype=np.float64)
        best = int(np.argmin(potentials))
        chosen.append(int(candidates[best]))
        closest, potential = dist[best], float(potentials[best])
    return x[chosen].copy()


def kmeanspp_seeds(x: np.ndarray, k: int, seed: int, gpus: int = 0) -> np.ndarray:
    """k-means++ starting centroids float32 (k, d) of rows float32 (n, d).

    Greedy on a seeded subsample of 32 rows per centroid (kept in row order) up to 1024
    centroids; FAISS's own k-means++ on every row above.
    """
    if k > _GREEDY_MAX_K:
        return faiss_seeds(x, k, seed, "KMEANS_PLUS_PLUS", gpus)
    rows = np.random.default_rng(seed).permutation(len(x))
    rows = np.sort(rows[: max(k, _GREEDY_ROWS_PER_CENTROID * k)])
    return greedy_kmeanspp(x[rows], k, seed)


def random_seeds(x: np.ndarray, k: int, seed: int, gpus: int = 0) -> np.ndarray:
    """k distinct rows float32 (k, d) of ``x`` float32 (n, d), drawn as FAISS draws them."""
    return faiss_seeds(x, k, seed, "RANDOM", gpus)


def faiss_seeds(x: np.ndarray, k: int, seed: int, method: str, gpus: int = 0) -> np.ndarray:
    """FAISS's initialisation ``ClusteringInitMethod_<method>`` alone: float32 (k, d).

    A FAISS k-means of no iterations returns its starting centroids; training from them gives
    the same centroids as FAISS seeding and training in one call.
    """
    import faiss

    n, dim = x.shape
    km = faiss.Kmeans(
        dim,
        k,
        niter=0,
        seed=seed,
        max_points_per_centroid=max(1, math.ceil(n / k)),  # every row: the caller sampled
        min_points_per_centroid=1,
        init_method=getattr(faiss, f"ClusteringInitMethod_{method}"),
        gpu=gpus if gpus > 0 else False,
        verbose=False,
    )
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32)


# ``cluster.init`` -> its seeder: the one place that decides how k-means starts.
SEEDERS: dict[str, Seeder] = {
    "kmeans++": kmeanspp_seeds,
    "random": random_seeds,
}
