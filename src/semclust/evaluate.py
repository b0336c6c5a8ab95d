"""Clustering metrics against ground truth: ACC (Hungarian matching), NMI, ARI, purity."""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from semclust import storage
from semclust.clustering.kmeans import read_assignments
from semclust.embed.pipeline import EMBEDDINGS_DIR


def truth_from_folders(uris: Sequence[str]) -> list[str]:
    """The class of each image is the name of the folder that holds it."""
    return [posixpath.basename(posixpath.dirname(u)) for u in uris]


def cluster_accuracy(truth: Sequence[Any], pred: Sequence[Any]) -> float:
    """Best one-to-one matching of clusters to classes (Hungarian), as a fraction correct."""
    from scipy.optimize import linear_sum_assignment

    _, t = np.unique(np.asarray(truth), return_inverse=True)
    _, p = np.unique(np.asarray(pred), return_inverse=True)
    counts = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(counts, (p, t), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(t))


def purity(truth: Sequence[Any], pred: Sequence[Any]) -> float:
    """Fraction of rows whose cluster's majority class is their class."""
    _, t = np.unique(np.asarray(truth), return_inverse=True)
    _, p = np.unique(np.asarray(pred), return_inverse=True)
    counts = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(counts, (p, t), 1)
    return float(counts.max(axis=1).sum() / len(t))


def clustering_scores(truth: Sequence[Any], pred: Sequence[Any]) -> dict[str, float]:
    if len(truth) != len(pred) or not len(truth):
        raise ValueError("truth and predictions must be non-empty and of equal length")
    return {
        "acc": cluster_accuracy(truth, pred),
        "nmi": float(normalized_mutual_info_score(truth, pred)),
        "ari": float(adjusted_rand_score(truth, pred)),
        "purity": purity(truth, pred),
        "n": len(truth),
    }


def evaluate_run(run_dir: str, truth: str = "folder-names") -> dict[str, Any]:
    """Score a run's k-means assignments; writes and returns ``metrics.json``.

    ``truth`` is ``folder-names`` (class = parent folder of each image) or a Parquet/CSV file with
    ``uri`` and ``label`` columns.
    """
    assignments = read_assignments(run_dir).select(["image_id", "cluster"])
    uris = pa.concat_tables(
        storage.read_parquet(u, ["image_id", "uri"])
        for u in storage.list_shards(storage.join(run_dir, EMBEDDINGS_DIR))
    )
    uri_of = dict(zip(uris["image_id"].to_pylist(), uris["uri"].to_pylist(), strict=True))
    ids = assignments["image_id"].to_pylist()
    row_uris = [uri_of[i] for i in ids]
    if truth == "folder-names":
        labels = truth_from_folders(row_uris)
    else:
        table = _read_truth(truth)
        label_of = dict(zip(table["uri"].to_pylist(), table["label"].to_pylist(), strict=True))
        keep = [i for i, u in enumerate(row_uris) if u in label_of]
        if not keep:
            raise ValueError(f"no image of the run has a label in {truth!r} (matched on uri)")
        labels = [label_of[row_uris[i]] for i in keep]
        assignments = assignments.take(keep)
    metrics = {"kmeans": clustering_scores(labels, assignments["cluster"].to_pylist())}
    storage.write_json(storage.join(run_dir, "metrics.json"), metrics)
    return metrics


def _read_truth(uri: str) -> pa.Table:
    if uri.endswith(".csv"):
        import pyarrow.csv as pacsv

        fs, path = storage.resolve(uri)
        with fs.open_input_stream(path) as f:
            table = pacsv.read_csv(f)
    else:
        table = storage.read_parquet(uri)
    missing = {"uri", "label"} - set(table.column_names)
    if missing:
        raise ValueError(
            f"truth file {uri!r} needs columns uri and label; missing {sorted(missing)}"
        )
    return table
