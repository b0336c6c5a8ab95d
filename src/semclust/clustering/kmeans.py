"""k-means on arrays: FAISS Lloyd iterations from a seeder, restarts, the two-level variant for
very large k, and the nearest-centroid search. Arrays in, arrays out: no storage, no Ray (the
cluster stage, ``cluster_stage``, reads the sample and writes the model).

Like faiss's ``contrib/clustering.py`` (``kmeans``, ``two_level_clustering``): the two-level
variant clusters into about sqrt(k) coarse clusters, then splits each in proportion to its size.
Distances are squared L2 in model space; with spherical k-means the rows are unit vectors there,
so a distance is ``2 - 2 cos``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from semclust.clustering.model import KMeansModel
from semclust.clustering.pca import RowTransform
from semclust.clustering.seeding import SEEDERS
from semclust.config import ClusterConfig
from semclust.index.faiss_ops import bucketed_search, nearest_two, to_gpus
from semclust.rundir.embeddings import normalize_rows

log = logging.getLogger(__name__)


class CentroidAssigner:
    """Two nearest centroids of embeddings, exact (flat) or through the coarse level (IVF).

    A flat search costs k d per row: fine up to some thousands of centroids, or on a GPU. For a
    two-level model on CPU the centroids are put in an IVF whose lists are the coarse clusters,
    and ``nprobe`` of them are searched per row.
    """

    def __init__(self, model: KMeansModel, *, gpus: int = 0, nprobe: int = 16) -> None:
        import faiss

        self.model = model
        dim = model.centroids.shape[1]
        self.exact = faiss.IndexFlatL2(dim)
        self.exact.add(model.centroids)
        self.index = self.exact
        self.ivf: Any = None  # the two-level model's IVF on CPU, else None (flat, or a GPU)
        self.method = "flat"
        if gpus:
            self.index = to_gpus(self.exact, shard=False)
            self.method = "flat (GPU)"
        elif model.coarse is not None:
            # Kept on self: the IVF does not own its quantizer in Python.
            self._quantizer = faiss.IndexFlatL2(dim)
            self._quantizer.add(model.coarse)
            ivf = faiss.IndexIVFFlat(self._quantizer, dim, len(model.coarse), faiss.METRIC_L2)
            ivf.is_trained = True
            ivf.add(model.centroids)
            ivf.nprobe = min(nprobe, len(model.coarse))
            self.index = self.ivf = ivf
            self.method = f"ivf over {len(model.coarse)} coarse clusters, nprobe {ivf.nprobe}"

    def assign_model_space(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(clusters int64 (n, 2), squared L2 float32 (n, 2)) of model-space rows (n, d)."""
        if self.ivf is not None and len(x) * self.ivf.nprobe > 4 * self.ivf.nlist:
            labels, dist = _bucketed_nearest_two(self.ivf, x)
        else:
            labels, dist = nearest_two(self.index, x)
        missing = (labels < 0).any(axis=1)
        if missing.any():
            # The probed lists held fewer than two centroids: those rows get the exact answer.
            labels[missing], dist[missing] = nearest_two(self.exact, x[missing])
        return labels, dist

    def assign(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(clusters int64 (n, 2), squared L2 float32 (n, 2)) of embeddings float32 (n, D)."""
        return self.assign_model_space(self.model.transform.apply(vectors))


def _bucketed_nearest_two(ivf: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``nearest_two`` through the coarse IVF with the rows grouped by coarse cluster, so each
    cell's centroids meet its rows in one matrix product (``faiss.contrib.big_batch_search``)
    rather than row by row: the same answer, several times faster on millions of rows."""
    labels = np.empty((len(x), 2), dtype=np.int64)
    dist = np.empty((len(x), 2), dtype=np.float32)
    step = 1 << 20  # bounds the (rows, nprobe) bucket arrays
    for s in range(0, len(x), step):
        d, i = bucketed_search(ivf, np.ascontiguousarray(x[s : s + step]), 2)
        dist[s : s + step], labels[s : s + step] = d, i
    return labels, dist


def assign(
    vectors: np.ndarray, centroids: np.ndarray, spherical: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Exact two nearest centroids of float32 (n, D) rows (no PCA): ((n, 2) int64, (n, 2) f32)."""
    model = KMeansModel(RowTransform(spherical=spherical), np.asarray(centroids, np.float32))
    return CentroidAssigner(model).assign(vectors)


def faiss_kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int,
    nredo: int,
    spherical: bool,
    init: str,
    seed: int,
    gpus: int = 0,
    timings: dict[str, float] | None = None,
) -> np.ndarray:
    """k-means on float32 (n, d) rows (all used: sample first); centroids float32 (k, d).

    Each of the ``nredo`` runs starts from the ``init`` seeder (``seeding.SEEDERS``) with seed
    ``seed + run`` and does ``niter`` Lloyd iterations in FAISS (on the GPUs when ``gpus`` > 0);
    the run with the lowest sum of squared distances is kept. ``timings``: seconds of seeding
    (``seed_s``) and of the iterations (``lloyd_s``) are added to it.
    """
    import faiss

    n, dim = x.shape
    if k > n:
        raise ValueError(f"cannot make {k} clusters of {n} rows; choose k <= {n}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    seeder = SEEDERS[init]
    best: tuple[float, np.ndarray] | None = None
    for redo in range(nredo):
        km = faiss.Kmeans(
            dim,
            k,
            niter=niter,
            nredo=1,
            spherical=spherical,
            seed=seed + redo,
            # The caller sampled already: FAISS must neither subsample again nor warn about few
            # points per centroid (train_kmeans logs that).
            max_points_per_centroid=max(1, math.ceil(n / k)),
            min_points_per_centroid=1,
            gpu=gpus if gpus > 0 else False,
            verbose=False,
        )
        start = time.perf_counter()
        init_centroids = seeder(x, k, seed + redo, gpus)
        seeded = time.perf_counter()
        km.train(x, init_centroids=init_centroids)
        if timings is not None:
            timings["seed_s"] = timings.get("seed_s", 0.0) + seeded - start
            timings["lloyd_s"] = timings.get("lloyd_s", 0.0) + time.perf_counter() - seeded
        centroids = np.asarray(km.centroids, dtype=np.float32)
        if nredo == 1:
            return centroids
        index = faiss.IndexFlatL2(dim)
        index.add(centroids)
        objective = float(nearest_two(index, x)[1][:, 0].sum(dtype=np.float64))
        if best is None or objective < best[0]:
            best = (objective, centroids)
    assert best is not None
    return best[1]


def allocate(k: int, sizes: np.ndarray) -> np.ndarray:
    """Split k centroids over coarse clusters of ``sizes`` int (k1,) rows, in proportion.

    Every non-empty cluster gets at least one and never more than its row count; the total is k
    (largest-remainder rounding, then one-at-a-time repair). Returns int (k1,).
    """
    n = sizes.sum()
    share = k * sizes / n
    alloc = np.minimum(np.maximum(np.floor(share), (sizes > 0).astype(float)), sizes).astype(int)
    while alloc.sum() < k:
        room = np.where(alloc < sizes, share - alloc, -np.inf)
        alloc[int(np.argmax(room))] += 1
    while alloc.sum() > k:
        over = np.where(alloc > 1, alloc - share, -np.inf)
        alloc[int(np.argmax(over))] -= 1
    return alloc


def two_level_kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int,
    nredo: int,
    spherical: bool,
    init: str,
    seed: int,
    gpus: int = 0,
    timings: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-level k-means of float32 (n, d) rows: sqrt(k) coarse clusters (``nredo`` restarts),
    then each split by k-means (one run) in proportion to its size.

    Returns (centroids float32 (k, d), coarse float32 (k1, d), parents int32 (k,)).
    """
    import faiss

    k1 = max(2, min(round(math.sqrt(k)), len(x) // 2))
    common = {
        "niter": niter,
        "spherical": spherical,
        "init": init,
        "gpus": gpus,
        "timings": timings,
    }
    coarse = faiss_kmeans(x, k1, nredo=nredo, seed=seed, **common)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(coarse)
    labels = nearest_two(index, x)[0][:, 0]
    alloc = allocate(k, np.bincount(labels, minlength=k1))
    centroids, parents = [], []
    for c in np.flatnonzero(alloc):
        rows = x[labels == c]
        if alloc[c] == 1:
            sub = rows.mean(axis=0, keepdims=True)
            sub = normalize_rows(sub) if spherical else sub
        else:
            sub = faiss_kmeans(rows, int(alloc[c]), nredo=1, seed=seed + int(c), **common)
        centroids.append(sub.astype(np.float32))
        parents.append(np.full(len(sub), c, dtype=np.int32))
    return np.concatenate(centroids), coarse, np.concatenate(parents)


def use_two_level(cc: ClusterConfig, k: int) -> bool:
    return cc.hierarchical == "on" or (cc.hierarchical == "auto" and k >= cc.hierarchical_min_k)


def train_kmeans(
    sample: np.ndarray, cc: ClusterConfig, gpus: int = 0, k: int | None = None
) -> tuple[KMeansModel, dict[str, Any]]:
    """Learn the transform and k-means on float32 (n, D) sample rows.

    ``k`` defaults to ``cc.k`` (which must then be an integer). Returns the model and a summary
    whose ``objective`` is the sum of squared L2 distances of the sample rows to their nearest
    centroid in model space (lower is better; comparable across restarts, not across k).
    """
    k = int(k if k is not None else cc.k)
    n, dim = sample.shape
    if k > n:
        raise ValueError(f"cluster.k={k} is larger than the {n} rows to cluster; choose k <= {n}")
    if n < 39 * k:
        log.warning("k-means: %d rows for k=%d: under 39 per centroid, clusters may be poor", n, k)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    transform = RowTransform.fit(sample, cc.pca_dim, cc.whiten, cc.spherical)
    x = transform.apply(sample)
    timings["transform_s"] = time.perf_counter() - start
    options = {
        "niter": cc.niter,
        "nredo": cc.nredo,
        "spherical": cc.spherical,
        "init": cc.init,
        "seed": cc.seed,
        "gpus": gpus,
        "timings": timings,
    }
    if use_two_level(cc, k):
        model = KMeansModel(transform, *two_level_kmeans(x, k, **options))
    else:
        model = KMeansModel(transform, faiss_kmeans(x, k, **options))
    start = time.perf_counter()
    _, dist = CentroidAssigner(model, gpus=gpus, nprobe=cc.assign_nprobe).assign_model_space(x)
    timings["objective_s"] = time.perf_counter() - start
    summary = {
        "k": k,
        "dim": dim,
        "model_dim": int(x.shape[1]),
        "metric": "spherical (L2-normalised rows, squared L2 = 2 - 2 cos)"
        if cc.spherical
        else "squared l2",
        "spherical": cc.spherical,
        "pca": transform.uses_pca,
        "pca_dim": int(x.shape[1]) if transform.uses_pca else None,
        "whiten": transform.whiten,
        "init": cc.init,
        "iterations": cc.niter,
        "nredo": cc.nredo,
        "objective": float(dist[:, 0].sum(dtype=np.float64)),
        "mean_sq_distance": float(dist[:, 0].mean(dtype=np.float64)),
        "trained_on": n,
        "seed": cc.seed,
        "gpus": gpus,
        "coarse_k": len(model.coarse) if model.coarse is not None else None,
        "timings": {key: round(value, 3) for key, value in timings.items()},
    }
    return model, summary
