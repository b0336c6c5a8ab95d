"""Scores of one clustering: against the truth (ACC, NMI, ARI, purity, per class), and without
it (size balance, cosine silhouette, seed stability). Arrays in, numbers out: no storage."""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np


def _sk() -> Any:
    """scikit-learn's metrics, imported when first needed: importing them costs seconds, which
    every ``semclust`` command (even ``--help``) would pay, since the CLI builds this parser."""
    import sklearn.metrics

    return sklearn.metrics


# --- scores of one labelling against the truth ---------------------------------------------------


def truth_from_folders(uris: Sequence[str]) -> list[str]:
    """The class of each image is the name of the folder that holds it."""
    return [posixpath.basename(posixpath.dirname(u)) for u in uris]


def _contingency(truth: Sequence[Any], pred: Sequence[Any]) -> tuple[np.ndarray, Any, Any]:
    """(counts int64 (clusters, classes), cluster values, class values)."""
    classes, t = np.unique(np.asarray(truth), return_inverse=True)
    clusters, p = np.unique(np.asarray(pred), return_inverse=True)
    counts = np.zeros((len(clusters), len(classes)), dtype=np.int64)
    np.add.at(counts, (p, t), 1)
    return counts, clusters, classes


def hungarian_match(truth: Sequence[Any], pred: Sequence[Any]) -> dict[Any, Any]:
    """Cluster -> class of the best one-to-one matching (most rows on the diagonal).

    With more clusters than classes the extra clusters are left out (their rows count as
    wrong); with fewer, some classes get no cluster.
    """
    from scipy.optimize import linear_sum_assignment

    counts, clusters, classes = _contingency(truth, pred)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return {clusters[r].item(): classes[c].item() for r, c in zip(rows, cols, strict=True)}


def cluster_accuracy(truth: Sequence[Any], pred: Sequence[Any]) -> float:
    """Best one-to-one matching of clusters to classes (Hungarian), as a fraction correct.

    Invariant to renumbering the clusters: a permuted but otherwise perfect labelling is 1.0.
    """
    from scipy.optimize import linear_sum_assignment

    counts, _, _ = _contingency(truth, pred)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / counts.sum())


def purity(truth: Sequence[Any], pred: Sequence[Any]) -> float:
    """Fraction of rows whose cluster's majority class is their class."""
    counts, _, _ = _contingency(truth, pred)
    return float(counts.max(axis=1).sum() / counts.sum())


def per_class_scores(truth: Sequence[Any], pred: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Precision and recall of each class when every cluster takes its matched class.

    ``{class: {"precision", "recall", "support", "cluster"}}``: precision is the share of the
    matched cluster's rows that are of the class (None when the class got no cluster), recall the
    share of the class's rows in it.
    """
    match = hungarian_match(truth, pred)
    counts, clusters, classes = _contingency(truth, pred)
    cluster_row = {c.item(): i for i, c in enumerate(clusters)}
    out: dict[str, dict[str, Any]] = {}
    for j, cls in enumerate(classes):
        support = int(counts[:, j].sum())
        cluster = next((c for c, k in match.items() if k == cls.item()), None)
        if cluster is None:
            out[str(cls)] = {"precision": None, "recall": 0.0, "support": support, "cluster": None}
            continue
        i = cluster_row[cluster]
        size = int(counts[i].sum())
        out[str(cls)] = {
            "precision": round(float(counts[i, j] / size), 5) if size else None,
            "recall": round(float(counts[i, j] / support), 5),
            "support": support,
            "cluster": cluster,
        }
    return out


def clustering_scores(truth: Sequence[Any], pred: Sequence[Any]) -> dict[str, float]:
    """ACC (Hungarian), NMI, ARI and purity of cluster ids ``pred`` against classes ``truth``."""
    if len(truth) != len(pred) or not len(truth):
        raise ValueError("truth and predictions must be non-empty and of equal length")
    return {
        "acc": cluster_accuracy(truth, pred),
        "nmi": float(_sk().normalized_mutual_info_score(truth, pred)),
        "ari": float(_sk().adjusted_rand_score(truth, pred)),
        "purity": purity(truth, pred),
        "n": len(truth),
    }


# --- scores that need no truth -------------------------------------------------------------------


def size_balance(sizes: np.ndarray) -> dict[str, Any]:
    """Cluster sizes int (k,): min, max, max/min, and entropy / log(k) (1.0 = all equal)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    k = len(sizes)
    p = sizes[sizes > 0] / max(1, sizes.sum())
    entropy = float(-(p * np.log(p)).sum()) / np.log(k) if k > 1 else 1.0
    return {
        "k": k,
        "empty": int((sizes == 0).sum()),
        "min": int(sizes.min()),
        "max": int(sizes.max()),
        "max_over_min": round(float(sizes.max() / sizes.min()), 4) if sizes.min() > 0 else None,
        "normalized_entropy": round(entropy, 5),
    }


def cosine_silhouette(x: np.ndarray, labels: np.ndarray) -> float | None:
    """Silhouette of float (n, D) rows with cluster ids (n,), cosine distance; None if < 2."""
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= len(labels):
        return None
    return float(silhouette_score(x, labels, metric="cosine"))


KNN_AGREEMENT_K = 10


def seed_stability(
    sample: np.ndarray, k: int, spherical: bool, niter: int, seeds: Sequence[int]
) -> dict[str, Any]:
    """How much k-means depends on its seed: mean pairwise ARI and NMI of the assignments of
    float32 (n, D) sample rows by k-means runs that differ only in the seed; and, per seed, the
    kNN agreement: the share of each row's ``KNN_AGREEMENT_K`` nearest neighbours in the sample
    that k-means put in its cluster (a backbone whose neighbourhoods its clusters keep scores
    high; one that only some seeds' clusters keep scores a low minimum)."""
    from semclust.clustering.kmeans import assign, faiss_kmeans
    from semclust.rundir.embeddings import normalize_rows

    x = normalize_rows(sample) if spherical else np.asarray(sample, np.float32)
    runs = []
    for seed in seeds:
        centroids = faiss_kmeans(
            x, k, niter=niter, nredo=1, spherical=spherical, init="kmeans++", seed=int(seed)
        )
        runs.append(assign(x, centroids, spherical)[0][:, 0])
    neighbours = _sample_neighbours(x, spherical, KNN_AGREEMENT_K)
    agreement = [float((r[neighbours] == r[:, None]).mean()) for r in runs if neighbours.size]
    pairs = list(combinations(range(len(runs)), 2))
    aris = [_sk().adjusted_rand_score(runs[a], runs[b]) for a, b in pairs]
    nmis = [_sk().normalized_mutual_info_score(runs[a], runs[b]) for a, b in pairs]
    return {
        "seeds": [int(s) for s in seeds],
        "rows": len(x),
        "k": k,
        "mean_pairwise_ari": round(float(np.mean(aris)), 5) if aris else None,
        "min_pairwise_ari": round(float(np.min(aris)), 5) if aris else None,
        "mean_pairwise_nmi": round(float(np.mean(nmis)), 5) if nmis else None,
        "knn_k": KNN_AGREEMENT_K,
        "mean_knn_agreement": round(float(np.mean(agreement)), 5) if agreement else None,
        "min_knn_agreement": round(float(np.min(agreement)), 5) if agreement else None,
    }


def _sample_neighbours(x: np.ndarray, spherical: bool, k: int) -> np.ndarray:
    """(n, k) row numbers of each row's k nearest other rows of ``x``, exactly."""
    import faiss

    k = min(k, len(x) - 1)
    if k < 1:
        return np.zeros((len(x), 0), np.int64)
    index = faiss.IndexFlatIP(x.shape[1]) if spherical else faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(x, np.float32))
    _, found = index.search(np.ascontiguousarray(x, np.float32), k + 1)
    # Each row finds itself first, except among exact duplicates: drop its own number wherever
    # it is, else the last.
    own = found == np.arange(len(x))[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), k)
    keep = np.ones_like(found, bool)
    keep[np.arange(len(x)), drop] = False
    return found[keep].reshape(len(x), k)
