"""How good are the clusters and labels: scores against ground truth, and scores that need none.

With ground truth (``--truth folder-names`` or a ``uri,label`` Parquet/CSV file), for the k-means
``assignments/`` and every refined ``assignments_<head>/``:

- ACC (clusters matched one-to-one to classes by the Hungarian method), NMI, ARI, purity, and
  the precision/recall of each class under that matching;
- ``retrieval``: top-1/5/10 precision of the run's index (share of an image's nearest images,
  itself excluded, that have its class), on a seeded sample of query images;
- ``knn_graph``: share of kNN-graph edges whose two ends have the same class;
- ``labels``: when ``labels/`` exists, accuracy and coverage of its labels (``unknown`` counts
  as not covered), overall, per source, and without the seed images themselves.

Without ground truth (always computed):

- ``silhouette``: cosine silhouette of each clustering on a seeded sample of rows;
- ``balance``: cluster sizes (min, max, max/min ratio, normalised entropy: 1 = equal sizes);
- ``stability``: mean pairwise ARI/NMI of k-means runs with different seeds on one sample.

Everything is written to ``metrics.json``; rows are read shard by shard, and only ids, class
codes and cluster numbers (a few bytes a row) are held at once, plus the samples.
"""

from __future__ import annotations

import argparse
import json
import logging
import posixpath
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semclust import storage
from semclust.clustering.kmeans import ASSIGNMENTS_DIR, read_assignments
from semclust.clustering.shards import read_clusters, rows_of_ids
from semclust.embed.pipeline import EMBEDDINGS_DIR

log = logging.getLogger(__name__)


def _sk() -> Any:
    """scikit-learn's metrics, imported when first needed: importing them costs seconds, which
    every ``semclust`` command (even ``--help``) would pay, since the CLI builds this parser."""
    import sklearn.metrics

    return sklearn.metrics


METRICS_FILE = "metrics.json"
LABELS_DIR = "labels"
UNKNOWN = "unknown"
HEADS = ("scan", "dec")  # refined assignments: assignments_<head>/
RETRIEVAL_K = (1, 5, 10)

__all__ = [
    "cluster_accuracy",
    "clustering_scores",
    "evaluate_run",
    "per_class_scores",
    "purity",
    "read_assignments",
    "truth_from_folders",
]


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


def seed_stability(
    sample: np.ndarray, k: int, spherical: bool, niter: int, seeds: Sequence[int]
) -> dict[str, Any]:
    """How much k-means depends on its seed: mean pairwise ARI and NMI of the assignments of
    float32 (n, D) sample rows by k-means runs that differ only in the seed."""
    from semclust.clustering.kmeans import assign, faiss_kmeans
    from semclust.clustering.shards import normalize_rows

    x = normalize_rows(sample) if spherical else np.asarray(sample, np.float32)
    runs = []
    for seed in seeds:
        centroids = faiss_kmeans(
            x, k, niter=niter, nredo=1, spherical=spherical, init="kmeans++", seed=int(seed)
        )
        runs.append(assign(x, centroids, spherical)[0][:, 0])
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
    }


# --- the run directory ---------------------------------------------------------------------------


@dataclass
class _Rows:
    """Every embedded row's image id (n,), with a sorted view for id -> row lookups."""

    ids: np.ndarray
    uris: list[str] | None = None

    def __post_init__(self) -> None:
        self.order = np.argsort(self.ids, kind="stable")

    def rows_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Rows int64 (same shape) of image ids; -1 for ids not in the run."""
        return rows_of_ids(self.ids, self.order, image_ids)


def _read_rows(run_dir: str, with_uris: bool) -> _Rows:
    shards = storage.list_shards(storage.join(run_dir, EMBEDDINGS_DIR))
    if not shards:
        raise ValueError(f"no embeddings in {run_dir!r}: run `semclust embed` first")
    columns = ["image_id", "uri"] if with_uris else ["image_id"]
    tables = [storage.read_parquet(u, columns) for u in shards]
    ids = np.concatenate([t.column("image_id").to_numpy() for t in tables])
    uris = [u for t in tables for u in t.column("uri").to_pylist()] if with_uris else None
    return _Rows(ids, uris)


def _truth_codes(rows: _Rows, truth: str) -> tuple[np.ndarray, list[str]]:
    """(class code int32 (n,) per row, -1 where unknown; class names)."""
    if truth == "folder-names":
        assert rows.uris is not None
        names = truth_from_folders(rows.uris)
        classes, codes = np.unique(np.asarray(names, dtype=object), return_inverse=True)
        return codes.astype(np.int32), [str(c) for c in classes]
    table = read_truth(truth)
    uris = [
        u if storage.is_remote(u) else storage.canonical_uri(u) for u in table["uri"].to_pylist()
    ]
    label_rows = rows.rows_of(np.array([storage.image_id_for(u) for u in uris], dtype=np.int64))
    labels = np.asarray(table["label"].to_pylist(), dtype=object)
    keep = label_rows >= 0
    if not keep.any():
        raise ValueError(f"no image of the run has a label in {truth!r} (matched on uri)")
    classes, codes = np.unique(labels[keep].astype(str), return_inverse=True)
    out = np.full(len(rows.ids), -1, dtype=np.int32)
    out[label_rows[keep]] = codes
    return out, [str(c) for c in classes]


def read_truth(uri: str) -> pa.Table:
    """A ``uri,label`` table from a Parquet or CSV file (local or object storage)."""
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
    return table.select(["uri", "label"]).cast(
        pa.schema([("uri", pa.string()), ("label", pa.string())])
    )


def available_assignments(run_dir: str) -> dict[str, str]:
    """Name -> folder of every clustering in the run: ``kmeans`` and each refined head."""
    out = {}
    for name, folder in (
        ("kmeans", ASSIGNMENTS_DIR),
        *((h, f"{ASSIGNMENTS_DIR}_{h}") for h in HEADS),
    ):
        if storage.list_shards(storage.join(run_dir, folder)):
            out[name] = folder
    return out


def _knn_purity(run_dir: str, rows: _Rows, codes: np.ndarray) -> dict[str, Any] | None:
    """Share of kNN edges (both ends with a known class) joining two images of one class."""
    from semclust.clustering.knn import KNN_DIR

    shards = storage.list_shards(storage.join(run_dir, KNN_DIR))
    if not shards:
        return None
    same = total = 0
    k = 0
    for uri in shards:
        table = storage.read_parquet(uri, ["image_id", "neighbors"])
        col = table.column("neighbors").combine_chunks()
        k = col.type.list_size
        src = rows.rows_of(table.column("image_id").to_numpy())
        dst = rows.rows_of(pc.list_flatten(col).to_numpy().reshape(-1, k))
        a = np.where(src >= 0, codes[np.maximum(src, 0)], -1)[:, None]
        b = np.where(dst >= 0, codes[np.maximum(dst, 0)], -1)
        valid = (a >= 0) & (b >= 0)
        same += int(((a == b) & valid).sum())
        total += int(valid.sum())
    return {"k": k, "edges": total, "purity": round(same / total, 5) if total else None}


def _retrieval(
    run_dir: str, rows: _Rows, codes: np.ndarray, queries: int, seed: int
) -> dict[str, Any] | None:
    """Top-1/5/10 precision of the run's index for a seeded sample of labelled images."""
    if not storage.exists(storage.join(run_dir, "index", "meta.json")):
        return None
    from semclust.index.search import SearchIndex

    index = SearchIndex(run_dir, device="cpu")
    labelled = np.flatnonzero(codes >= 0)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(labelled, size=min(queries, len(labelled)), replace=False))
    kmax = max(RETRIEVAL_K)
    query_ids = rows.ids[pick]
    hits = index.search_ids(query_ids.tolist(), kmax + 1)
    precision = {k: [] for k in RETRIEVAL_K}
    for qid, qcode, found in zip(query_ids, codes[pick], hits, strict=True):
        others = np.array([h.image_id for h in found if h.image_id != qid][:kmax], np.int64)
        got = rows.rows_of(others)
        match = np.where(got >= 0, codes[np.maximum(got, 0)] == qcode, False)
        for k in RETRIEVAL_K:
            if len(match) >= k:
                precision[k].append(float(match[:k].mean()))
    out: dict[str, Any] = {"queries": len(pick), "index": index.meta.get("spec", {}).get("kind")}
    for k in RETRIEVAL_K:
        out[f"top{k}"] = round(float(np.mean(precision[k])), 5) if precision[k] else None
    return out


def _label_scores(
    run_dir: str, rows: _Rows, codes: np.ndarray, classes: list[str]
) -> dict[str, Any] | None:
    """Accuracy/coverage of labels/ against the truth, overall, per source, without seeds."""
    shards = storage.list_shards(storage.join(run_dir, LABELS_DIR))
    if not shards:
        return None
    table = pa.concat_tables(
        storage.read_parquet(u, ["image_id", "label", "source"]) for u in shards
    )
    where = rows.rows_of(table.column("image_id").to_numpy())
    truth_code = np.where(where >= 0, codes[np.maximum(where, 0)], -1)
    keep = truth_code >= 0
    code_of = {c: i for i, c in enumerate(classes)}
    labels = table.column("label").to_pylist()
    sources = np.asarray(table.column("source").to_pylist(), dtype=object)
    pred = np.array([code_of.get(lbl, -2) if lbl != UNKNOWN else -1 for lbl in labels])
    pred = pred[keep]
    truth_code, sources = truth_code[keep], sources[keep]

    def score(mask: np.ndarray) -> dict[str, Any]:
        covered = mask & (pred != -1)
        n = int(mask.sum())
        return {
            "rows": n,
            "coverage": round(float(covered.sum() / n), 5) if n else None,
            "accuracy": round(float((pred[covered] == truth_code[covered]).mean()), 5)
            if covered.any()
            else None,
            # unknown counted as wrong: accuracy over every row
            "accuracy_all_rows": round(float((pred[mask] == truth_code[mask]).mean()), 5)
            if n
            else None,
        }

    out = score(np.ones(len(pred), dtype=bool))
    out["without_seeds"] = score(sources != "seed")
    out["by_source"] = {str(s): score(sources == s) for s in sorted(set(sources.tolist()))}
    return out


def evaluate_run(
    run_dir: str,
    truth: str | None = "folder-names",
    *,
    silhouette_sample: int = 5000,
    stability_seeds: int = 3,
    stability_sample: int = 20_000,
    retrieval_queries: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Score every clustering (and the labels) of a run; writes and returns ``metrics.json``.

    ``truth`` is ``folder-names`` (class = parent folder of each image), a Parquet/CSV file with
    ``uri`` and ``label`` columns, or None for the label-free scores only. Rows without a known
    class are left out of the truth scores (counted in ``rows.without_truth``).
    """
    from semclust.clustering.shards import embedding_shards, sample_rows

    start = time.perf_counter()
    found = available_assignments(run_dir)
    if "kmeans" not in found:
        raise ValueError(f"no assignments in {run_dir!r}: run `semclust cluster` first")
    rows = _read_rows(run_dir, with_uris=truth == "folder-names")
    clusters = {name: read_clusters(run_dir, folder, rows) for name, folder in found.items()}
    metrics: dict[str, Any] = {"truth": truth, "rows": {"embedded": len(rows.ids)}}
    codes = classes = None
    if truth is not None:
        codes, classes = _truth_codes(rows, truth)
        labelled = codes >= 0
        metrics["rows"]["without_truth"] = int((~labelled).sum())
        metrics["classes"] = len(classes)
        for name, assigned in clusters.items():
            ok = labelled & (assigned >= 0)
            if not ok.any():
                continue
            t = np.asarray(classes, dtype=object)[codes[ok]]
            scores: dict[str, Any] = clustering_scores(t.tolist(), assigned[ok].tolist())
            scores["per_class"] = per_class_scores(t.tolist(), assigned[ok].tolist())
            metrics[name] = scores
        metrics["knn_graph"] = _knn_purity(run_dir, rows, codes)
        metrics["retrieval"] = _retrieval(run_dir, rows, codes, retrieval_queries, seed)
        metrics["labels"] = _label_scores(run_dir, rows, codes, classes)
    # Label-free scores on one seeded sample of rows.
    shards = embedding_shards(run_dir)
    sample_ids, sample = sample_rows(shards, silhouette_sample, seed, with_ids=True)
    where = rows.rows_of(sample_ids)
    label_free: dict[str, Any] = {}
    for name, assigned in clusters.items():
        k = int(assigned.max()) + 1
        sizes = np.bincount(assigned[assigned >= 0], minlength=k)
        label_free[name] = {
            "silhouette": _round(cosine_silhouette(sample, assigned[where])),
            "balance": size_balance(sizes),
        }
    kmeans_info = storage.read_json(storage.join(run_dir, "model", "kmeans.json"))
    if stability_seeds >= 2:
        stab_sample = sample_rows(shards, stability_sample, seed + 1)
        label_free["stability"] = seed_stability(
            stab_sample,
            int(kmeans_info["k"]),
            bool(kmeans_info.get("spherical", True)),
            int(kmeans_info.get("iterations", 20)),
            seeds=[seed + 100 + i for i in range(stability_seeds)],
        )
    metrics["label_free"] = label_free
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    storage.write_json(storage.join(run_dir, METRICS_FILE), metrics)
    return metrics


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


# --- command line --------------------------------------------------------------------------------


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``semclust evaluate`` (besides the common --run-dir)."""
    parser.add_argument(
        "--truth",
        default="folder-names",
        help="folder-names (class = parent folder), a Parquet/CSV file with uri,label, or none "
        "(label-free scores only)",
    )
    parser.add_argument("--silhouette-sample", type=int, default=5000)
    parser.add_argument("--stability-seeds", type=int, default=3, help="k-means seeds compared")
    parser.add_argument("--retrieval-queries", type=int, default=1000)
    parser.add_argument("--eval-seed", type=int, default=0)


def run_evaluate_command(args: argparse.Namespace) -> int:
    """``semclust evaluate``: writes metrics.json and prints the headline scores as JSON."""
    if not getattr(args, "run_dir", None):
        raise ValueError("no run directory given: pass --run-dir")
    for name in ("silhouette_sample", "retrieval_queries"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    truth = None if str(args.truth).lower() == "none" else args.truth
    metrics = evaluate_run(
        args.run_dir,
        truth,
        silhouette_sample=args.silhouette_sample,
        stability_seeds=args.stability_seeds,
        retrieval_queries=args.retrieval_queries,
        seed=args.eval_seed,
    )
    print(json.dumps(headline(metrics), indent=2))
    return 0


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scores worth a glance (no per-class tables): for printing and comparing runs."""
    out: dict[str, Any] = {}
    for name in ("kmeans", *HEADS):
        if name in metrics:
            out[name] = {k: metrics[name][k] for k in ("acc", "nmi", "ari", "purity", "n")}
    for key in ("knn_graph", "retrieval"):
        if metrics.get(key):
            out[key] = metrics[key]
    if metrics.get("labels"):
        lab = metrics["labels"]
        out["labels"] = {k: lab[k] for k in ("rows", "coverage", "accuracy")}
        out["labels"]["accuracy_without_seeds"] = lab["without_seeds"]["accuracy"]
    lf = metrics.get("label_free", {})
    out["label_free"] = {
        name: {
            "silhouette": v["silhouette"],
            "normalized_entropy": v["balance"]["normalized_entropy"],
        }
        for name, v in lf.items()
        if name != "stability"
    }
    if "stability" in lf:
        out["label_free"]["stability_ari"] = lf["stability"]["mean_pairwise_ari"]
    return out
