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

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from semclust import storage
from semclust.evaluate.scores import (
    clustering_scores,
    cosine_silhouette,
    per_class_scores,
    seed_stability,
    size_balance,
    truth_from_folders,
)
from semclust.rundir import layout
from semclust.rundir.embeddings import RunRows, read_clusters
from semclust.rundir.labels import read_labels
from semclust.rundir.tables import iter_knn, knn_parts

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
HEADS = ("scan", "dec")  # refined assignments: assignments_<head>/
RETRIEVAL_K = (1, 5, 10)


def _truth_codes(rows: RunRows, truth: str) -> tuple[np.ndarray, list[str]]:
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
        ("kmeans", layout.ASSIGNMENTS),
        *((h, layout.assignments_of(h)) for h in HEADS),
    ):
        if storage.list_shards(storage.join(run_dir, folder)):
            out[name] = folder
    return out


def _knn_purity(run_dir: str, rows: RunRows, codes: np.ndarray) -> dict[str, Any] | None:
    """Share of kNN edges (both ends with a known class) joining two images of one class."""
    if not knn_parts(run_dir):
        return None
    same = total = 0
    k = 0
    for part in iter_knn(run_dir, similarities=False):
        k = part.k
        src = rows.rows_of(part.ids)
        dst = rows.rows_of(part.neighbors)
        a = np.where(src >= 0, codes[np.maximum(src, 0)], -1)[:, None]
        b = np.where(dst >= 0, codes[np.maximum(dst, 0)], -1)
        valid = (a >= 0) & (b >= 0)
        same += int(((a == b) & valid).sum())
        total += int(valid.sum())
    return {"k": k, "edges": total, "purity": round(same / total, 5) if total else None}


def _retrieval(
    run_dir: str, rows: RunRows, codes: np.ndarray, queries: int, seed: int
) -> dict[str, Any] | None:
    """Top-1/5/10 precision of the run's index for a seeded sample of labelled images."""
    if not storage.exists(storage.join(run_dir, layout.INDEX, "meta.json")):
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
    run_dir: str, rows: RunRows, codes: np.ndarray, classes: list[str]
) -> dict[str, Any] | None:
    """Accuracy/coverage of labels/ against the truth, overall, per source, without seeds."""
    table = read_labels(run_dir, ["image_id", "label", "source"])
    if table is None:
        return None
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
    from semclust.rundir.embeddings import embedding_shards, sample_rows

    start = time.perf_counter()
    found = available_assignments(run_dir)
    if "kmeans" not in found:
        raise ValueError(f"no assignments in {run_dir!r}: run `semclust cluster` first")
    rows = RunRows.load(run_dir, with_uris=truth == "folder-names")
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
            # Integer codes, not class names: the scores do not depend on the names, and 10^7
            # strings sorted once per score would take minutes and gigabytes.
            t, a = codes[ok], assigned[ok]
            scores: dict[str, Any] = clustering_scores(t, a)
            per_code = per_class_scores(t, a)
            scores["per_class"] = {classes[int(code)]: v for code, v in per_code.items()}
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
    kmeans_info = storage.read_json(storage.join(run_dir, layout.MODEL, "kmeans.json"))
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
    storage.write_json(storage.join(run_dir, layout.METRICS), metrics)
    return metrics


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


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
        out["label_free"]["knn_agreement"] = lf["stability"].get("mean_knn_agreement")
    return out
