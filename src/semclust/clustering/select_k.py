"""``cluster.k=auto``: choose k on a sample by silhouette, ties broken by the objective's elbow.

Arrays in, arrays out (the cluster stage draws the sample and writes ``k_selection.json``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from semclust.clustering.kmeans import CentroidAssigner, faiss_kmeans
from semclust.clustering.model import KMeansModel
from semclust.clustering.pca import RowTransform
from semclust.config import ClusterConfig

log = logging.getLogger(__name__)

_ELBOW_SILHOUETTE_TOLERANCE = 0.02  # silhouettes this close to the best count as a tie


def k_candidates(k_min: int, k_max: int, count: int, n: int) -> list[int]:
    """Every k in [k_min, k_max] when there are at most ``count``, else ``count`` spread
    geometrically; never more than n - 1 (a silhouette needs two rows in some cluster)."""
    k_max = min(k_max, n - 1)
    if k_max < k_min:
        raise ValueError(
            f"cluster.k=auto needs more rows than k_min={k_min}; the sample has {n} rows"
        )
    if k_max - k_min + 1 <= count:
        return list(range(k_min, k_max + 1))
    return sorted({round(float(v)) for v in np.geomspace(k_min, k_max, count)})


def elbow(ks: list[int], objectives: list[float]) -> int | None:
    """The k farthest below the chord from the first to the last point of the objective curve
    (both axes scaled to [0, 1]); None with fewer than 3 points or a flat curve."""
    if len(ks) < 3:
        return None
    x = (np.asarray(ks, float) - ks[0]) / (ks[-1] - ks[0])
    obj = np.asarray(objectives, float)
    span = obj.max() - obj.min()
    if span <= 0:
        return None
    y = (obj - obj.min()) / span
    chord = y[0] + (y[-1] - y[0]) * x
    return int(ks[int(np.argmax(chord - y))])


def pairwise_distances(x: np.ndarray) -> np.ndarray:
    """Euclidean distances float64 (m, m) between rows float (m, d), zero on the diagonal."""
    x = np.asarray(x, dtype=np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0))
    np.fill_diagonal(dist, 0.0)
    return dist


def select_k(sample: np.ndarray, cc: ClusterConfig, gpus: int = 0) -> tuple[int, dict[str, Any]]:
    """Try candidate k on float32 (n, D) sample rows; pick by silhouette, break ties by elbow.

    For each k: k-means (one run), the objective (sum of squared distances) and the silhouette
    on ``silhouette_sample`` rows. The chosen k has the best silhouette, or, among those within
    0.02 of it, the one nearest the objective's elbow. Returns (k, the table for k_selection.json).
    """
    from sklearn.metrics import silhouette_score

    transform = RowTransform.fit(sample, cc.pca_dim, cc.whiten, cc.spherical)
    x = transform.apply(sample)
    rng = np.random.default_rng(cc.seed)
    sil_rows = rng.choice(len(x), size=min(cc.silhouette_sample, len(x)), replace=False)
    sil_dist = pairwise_distances(x[sil_rows])  # one matrix for every candidate k
    rows = []
    for k in k_candidates(cc.k_min, cc.k_max, cc.k_candidates, len(x)):
        start = time.perf_counter()
        centroids = faiss_kmeans(
            x,
            k,
            niter=cc.niter,
            nredo=1,
            spherical=cc.spherical,
            init=cc.init,
            seed=cc.seed,
            gpus=gpus,
        )
        assigner = CentroidAssigner(KMeansModel(transform, centroids), gpus=gpus)
        labels, dist = assigner.assign_model_space(x)
        sil_labels = labels[sil_rows, 0]
        silhouette = (
            float(silhouette_score(sil_dist, sil_labels, metric="precomputed"))
            if len(np.unique(sil_labels)) > 1
            else -1.0
        )
        rows.append(
            {
                "k": k,
                "objective": float(dist[:, 0].sum(dtype=np.float64)),
                "silhouette": round(silhouette, 5),
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
        log.info("k=auto: k=%d silhouette %.4f", k, silhouette)
    choice = choose_k(rows)
    table = {
        **choice,
        "sample_rows": len(x),
        "silhouette_rows": len(sil_rows),
        "candidates": rows,
    }
    return choice["chosen_k"], table


def choose_k(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The choice among ``rows`` (k, objective, silhouette each): ``chosen_k`` (best silhouette,
    ties by elbow), ``best_silhouette_k``, ``elbow_k`` and the rule."""
    ks = [r["k"] for r in rows]
    best = max(r["silhouette"] for r in rows)
    knee = elbow(ks, [r["objective"] for r in rows])
    best_k = max(rows, key=lambda r: r["silhouette"])["k"]
    near_best = [r["k"] for r in rows if r["silhouette"] >= best - _ELBOW_SILHOUETTE_TOLERANCE]
    chosen = best_k if knee is None else min(near_best, key=lambda k: (abs(k - knee), k))
    return {
        "chosen_k": chosen,
        "best_silhouette_k": best_k,
        "elbow_k": knee,
        "rule": "best silhouette; among silhouettes within "
        f"{_ELBOW_SILHOUETTE_TOLERANCE} of it, the k nearest the objective's elbow",
    }
