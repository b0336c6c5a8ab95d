"""What the report shows, read from a run directory without gathering every row on the driver.

Per-cluster figures come from the assignments shards, summarised shard by shard in Ray tasks:
counts, summed distances, the rows nearest each centroid and a seeded random sample (see
:mod:`semclust.report.sampling`). Only the few images the report shows are then looked up in the
embeddings shards (URI and size), together with the embeddings of the map sample.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semclust import storage
from semclust.report.sampling import hash_key, key_threshold, smallest_per_group

log = logging.getLogger(__name__)

ASSIGNMENTS_DIR = "assignments"
EMBEDDINGS_DIR = "embeddings"
FAILURES_DIR = "failures"
LABELS_DIR = "labels"
DUPLICATES_DIR = "duplicates"
MODEL_DIR = "model"

# Different salts keep the random gallery sample and the map sample independent.
_SAMPLE_SALT, _MAP_SALT = 1, 2
# Each shard sends a little more than its share of the map sample, so the merged sample is
# almost surely full; the driver then keeps exactly ``map_sample`` rows.
_MAP_OVERSAMPLE = 1.25


# --- per-shard work (runs in Ray tasks) ------------------------------------------------------


def summarize_assignments_shard(
    shard_uri: str, k: int, n_nearest: int, n_random: int, seed: int, map_fraction: float
) -> dict[str, np.ndarray]:
    """Per-cluster aggregates and candidates of one assignments shard.

    Returns ``counts`` int64 (k,), ``dist_sum`` float64 (k,), and candidate rows as parallel
    arrays: ``near_*`` (the ``n_nearest`` smallest distances per cluster), ``rand_*`` (the
    ``n_random`` smallest hash keys per cluster) and ``map_*`` (rows whose map key is below the
    sampling threshold).
    """
    table = storage.read_parquet(shard_uri, columns=["image_id", "cluster", "distance"])
    ids = table.column("image_id").to_numpy().astype(np.int64)
    clusters = table.column("cluster").to_numpy().astype(np.int64)
    dist = table.column("distance").to_numpy().astype(np.float64)
    if len(clusters) and (clusters.min() < 0 or clusters.max() >= k):
        raise ValueError(
            f"{shard_uri} assigns clusters outside 0..{k - 1} (model/ holds {k} centroids): the "
            "assignments are stale; run `semclust cluster --mode overwrite`"
        )
    near = smallest_per_group(clusters, dist, n_nearest, ids)
    rand_key = hash_key(ids, seed * 8 + _SAMPLE_SALT)
    rand = smallest_per_group(clusters, rand_key, n_random, ids)
    map_key = hash_key(ids, seed * 8 + _MAP_SALT)
    on_map = np.flatnonzero(map_key <= key_threshold(map_fraction))
    return {
        "rows": np.int64(len(ids)),
        "counts": np.bincount(clusters, minlength=k).astype(np.int64),
        "dist_sum": np.bincount(clusters, weights=dist, minlength=k),
        "near_id": ids[near],
        "near_cluster": clusters[near],
        "near_dist": dist[near],
        "rand_id": ids[rand],
        "rand_cluster": clusters[rand],
        "rand_key": rand_key[rand],
        "rand_dist": dist[rand],
        "map_id": ids[on_map],
        "map_cluster": clusters[on_map],
        "map_key": map_key[on_map],
    }


def lookup_embeddings_shard(
    shard_uri: str, wanted_ids: np.ndarray, map_ids: np.ndarray
) -> dict[str, Any]:
    """URI, width and height of the ``wanted_ids`` in one embeddings shard, and the embeddings
    (float32 (m, D)) of the ``map_ids`` in it. Only the columns needed are read."""
    ids = storage.read_parquet(shard_uri, columns=["image_id"]).column(0).to_numpy()
    want = np.isin(ids, wanted_ids)
    on_map = np.isin(ids, map_ids)
    out: dict[str, Any] = {
        "id": ids[want],
        "uri": [],
        "width": np.zeros(0, np.int32),
        "height": np.zeros(0, np.int32),
        "map_id": ids[on_map],
        "map_vec": None,
    }
    if want.any():
        meta = storage.read_parquet(shard_uri, columns=["uri", "width", "height"]).filter(
            pa.array(want)
        )
        out["uri"] = meta.column("uri").to_pylist()
        out["width"] = meta.column("width").to_numpy().astype(np.int32)
        out["height"] = meta.column("height").to_numpy().astype(np.int32)
    if on_map.any():
        col = (
            storage.read_parquet(shard_uri, columns=["embedding"])
            .filter(pa.array(on_map))
            .column(0)
            .combine_chunks()
        )
        values = pc.list_flatten(col).to_numpy(zero_copy_only=False)
        out["map_vec"] = np.asarray(values, dtype=np.float32).reshape(-1, col.type.list_size)
    return out


# --- driver side -----------------------------------------------------------------------------


@dataclass
class Member:
    """One image the report shows."""

    image_id: int
    cluster: int = -1
    distance: float | None = None  # squared L2 to its centroid, as in assignments/
    uri: str = ""
    width: int = 0
    height: int = 0
    label: str | None = None
    confidence: float | None = None


@dataclass
class AssignmentSummary:
    """Per-cluster figures over every assigned row, and the rows the report shows."""

    k: int
    rows: int
    counts: np.ndarray  # int64 (k,)
    dist_sum: np.ndarray  # float64 (k,)
    nearest: dict[int, list[Member]]  # cluster -> nearest to centroid first
    sample: dict[int, list[Member]]  # cluster -> seeded random members not in ``nearest``
    map_ids: np.ndarray  # int64 (m,)
    map_clusters: np.ndarray  # int64 (m,)


def _run_tasks(fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], what: str) -> list[Any]:
    """Run ``fn(*args)`` for every call as Ray tasks, logging progress; results in call order."""
    import ray

    remote = ray.remote(num_cpus=1)(storage.with_s3_options(fn))
    futures = [remote.remote(*args) for args in calls]
    index = {f: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    pending = list(futures)
    last_log = time.monotonic()
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=30)
        for f in done:
            results[index[f]] = ray.get(f)
        if time.monotonic() - last_log > 5 or not pending:
            log.info("%s: %d/%d shards", what, len(futures) - len(pending), len(futures))
            last_log = time.monotonic()
    return results


def summarize_assignments(
    run_dir: str, k: int, n_nearest: int, n_sample: int, map_sample: int, seed: int
) -> AssignmentSummary:
    """Summarise every assignments shard in Ray tasks and merge the candidates."""
    shards = storage.list_shards(storage.join(run_dir, ASSIGNMENTS_DIR))
    if not shards:
        raise ValueError(
            f"no assignments in {run_dir!r}: run `semclust cluster` (or `semclust run`) before "
            "`semclust report`"
        )
    total = sum(storage.parquet_num_rows(u) for u in shards)
    fraction = _MAP_OVERSAMPLE * map_sample / max(total, 1)
    # The random sample excludes the nearest rows: keep enough candidates to drop them later.
    n_random = n_sample + n_nearest if n_sample else 0
    parts = _run_tasks(
        summarize_assignments_shard,
        [(u, k, n_nearest, n_random, seed, fraction) for u in shards],
        "report: summarising assignments",
    )
    cat = {key: np.concatenate([p[key] for p in parts]) for key in parts[0] if key != "rows"}
    counts = np.sum([p["counts"] for p in parts], axis=0)
    dist_sum = np.sum([p["dist_sum"] for p in parts], axis=0)

    nearest: dict[int, list[Member]] = {c: [] for c in range(k)}
    sel = smallest_per_group(cat["near_cluster"], cat["near_dist"], n_nearest, cat["near_id"])
    for i in sel:
        c = int(cat["near_cluster"][i])
        nearest[c].append(Member(int(cat["near_id"][i]), c, float(cat["near_dist"][i])))

    sample: dict[int, list[Member]] = {c: [] for c in range(k)}
    shown = {m.image_id for members in nearest.values() for m in members}
    sel = smallest_per_group(cat["rand_cluster"], cat["rand_key"], n_random, cat["rand_id"])
    for i in sel:
        c, image_id = int(cat["rand_cluster"][i]), int(cat["rand_id"][i])
        if image_id not in shown and len(sample[c]) < n_sample:
            sample[c].append(Member(image_id, c, float(cat["rand_dist"][i])))

    order = np.lexsort((cat["map_id"], cat["map_key"]))[:map_sample]
    rows = int(sum(int(p["rows"]) for p in parts))
    if rows != total:
        raise RuntimeError(f"read {rows} assignment rows but the shard metadata says {total}")
    return AssignmentSummary(
        k=k,
        rows=rows,
        counts=counts,
        dist_sum=dist_sum,
        nearest=nearest,
        sample=sample,
        map_ids=cat["map_id"][order],
        map_clusters=cat["map_cluster"][order],
    )


@dataclass
class EmbeddingLookup:
    """URIs and sizes of the shown images, and the map sample's embeddings."""

    meta: dict[int, tuple[str, int, int]]  # image_id -> (uri, width, height)
    map_ids: np.ndarray  # int64 (m,)
    map_vectors: np.ndarray  # float32 (m, D)


def lookup_embeddings(run_dir: str, wanted_ids: set[int], map_ids: np.ndarray) -> EmbeddingLookup:
    """Look the shown images and the map sample up in every embeddings shard, in Ray tasks."""
    import ray

    shards = storage.list_shards(storage.join(run_dir, EMBEDDINGS_DIR))
    if not shards:
        raise ValueError(f"no embeddings in {run_dir!r}: run `semclust embed` first")
    wanted_ref = ray.put(np.array(sorted(wanted_ids), dtype=np.int64))
    map_ref = ray.put(np.asarray(map_ids, dtype=np.int64))
    parts = _run_tasks(
        lookup_embeddings_shard,
        [(u, wanted_ref, map_ref) for u in shards],
        "report: looking up images and the map sample",
    )
    meta: dict[int, tuple[str, int, int]] = {}
    for p in parts:
        for image_id, uri, w, h in zip(p["id"], p["uri"], p["width"], p["height"], strict=True):
            meta[int(image_id)] = (uri, int(w), int(h))
    found = [(p["map_id"], p["map_vec"]) for p in parts if p["map_vec"] is not None]
    if found:
        ids = np.concatenate([f[0] for f in found])
        vectors = np.concatenate([f[1] for f in found])
    else:
        ids, vectors = np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    missing = wanted_ids - meta.keys()
    if missing:
        raise RuntimeError(
            f"{len(missing)} assigned images are not in embeddings/ (e.g. id {min(missing)}): the "
            "assignments are stale; run `semclust cluster --mode overwrite`"
        )
    return EmbeddingLookup(meta, ids, vectors)


def read_centroids(run_dir: str) -> np.ndarray:
    """model/centroids.npy as float32 (k, d), d in model space (after PCA, if the model has one).

    ``kmeans.json`` is written last by the cluster stage: without it the model is incomplete.
    """
    uri = storage.join(run_dir, MODEL_DIR, "centroids.npy")
    if not storage.exists(storage.join(run_dir, MODEL_DIR, "kmeans.json")):
        raise ValueError(
            f"{run_dir!r} has no complete k-means model: run `semclust cluster` before "
            "`semclust report`"
        )
    return np.asarray(np.load(io.BytesIO(storage.read_bytes(uri))), dtype=np.float32)


def nearest_clusters(
    centroids: np.ndarray, n: int, chunk: int = 1024
) -> list[list[tuple[int, float]]]:
    """For each centroid, the ``n`` most similar other centroids as (cluster, cosine), best first.

    Works on row chunks so that memory stays O(chunk x k) for any number of clusters.
    """
    k = len(centroids)
    n = min(n, k - 1)
    if n <= 0:
        return [[] for _ in range(k)]
    unit = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    out: list[list[tuple[int, float]]] = []
    for start in range(0, k, chunk):
        sims = unit[start : start + chunk] @ unit.T
        rows = np.arange(len(sims))
        sims[rows, rows + start] = -np.inf
        top = np.argpartition(-sims, n - 1, axis=1)[:, :n]
        for r, cand in enumerate(top):
            best = cand[np.lexsort((cand, -sims[r, cand]))]
            out.append([(int(c), float(sims[r, c])) for c in best])
    return out


def read_optional_json(uri: str) -> Any:
    return storage.read_json(uri) if storage.exists(uri) else None


def _read_all(dir_uri: str, columns: list[str]) -> pa.Table | None:
    shards = storage.list_shards(dir_uri)
    if not shards:
        return None
    return pa.concat_tables([storage.read_parquet(u, columns=columns) for u in shards])


@dataclass
class ClusterLabel:
    label: str
    share: float  # fraction of the cluster's labelled images that carry this label
    confidence: float | None  # mean confidence of those images
    labelled: int  # labelled images in the cluster
    source: str


@dataclass
class LabelSummary:
    per_cluster: dict[int, ClusterLabel]
    per_image: dict[int, tuple[str, float | None]]  # shown image -> (label, confidence)
    rows: int


def read_labels(run_dir: str, shown_ids: set[int]) -> LabelSummary | None:
    """Majority label per cluster and the labels of the shown images, if labels/ exists.

    Joins labels with the (image_id, cluster) columns of assignments: 12 bytes a row on the
    driver, never the embeddings.
    """
    labels = _read_all(
        storage.join(run_dir, LABELS_DIR), ["image_id", "label", "confidence", "source"]
    )
    if labels is None:
        return None
    assigned = _read_all(storage.join(run_dir, ASSIGNMENTS_DIR), ["image_id", "cluster"])
    if assigned is None:
        return None
    labels = labels.filter(pc.is_valid(labels.column("label")))
    joined = labels.join(assigned, "image_id", join_type="inner")
    per_label = joined.group_by(["cluster", "label"]).aggregate(
        [("image_id", "count"), ("confidence", "mean"), ("source", "distinct")]
    )
    per_cluster: dict[int, ClusterLabel] = {}
    totals: dict[int, int] = {}
    rows = per_label.to_pylist()
    for row in rows:
        totals[row["cluster"]] = totals.get(row["cluster"], 0) + row["image_id_count"]
    # Most images first, then the label name, so that ties are broken the same way every time.
    for row in sorted(rows, key=lambda r: (-r["image_id_count"], str(r["label"]))):
        c = int(row["cluster"])
        if c in per_cluster:
            continue
        per_cluster[c] = ClusterLabel(
            label=str(row["label"]),
            share=row["image_id_count"] / totals[c],
            confidence=row["confidence_mean"],
            labelled=totals[c],
            source=", ".join(sorted(str(s) for s in row["source_distinct"] if s is not None)),
        )
    mine = labels.filter(
        pc.is_in(labels.column("image_id"), pa.array(sorted(shown_ids), pa.int64()))
    )
    per_image: dict[int, tuple[str, float | None]] = {}
    for row in mine.to_pylist():
        prev = per_image.get(row["image_id"])
        conf = row["confidence"]
        # An image with labels from several sources shows its most confident one.
        if prev is None or (conf or 0.0) > (prev[1] or 0.0):
            per_image[row["image_id"]] = (str(row["label"]), conf)
    return LabelSummary(per_cluster, per_image, labels.num_rows)


@dataclass
class DuplicateGroup:
    group: int
    size: int
    members: list[Member]


@dataclass
class DuplicateSummary:
    groups: int  # groups of two or more images
    images: int  # images in those groups
    shown: list[DuplicateGroup] = field(default_factory=list)


def read_duplicates(run_dir: str, max_groups: int, per_group: int) -> DuplicateSummary | None:
    """Near-duplicate groups, largest first, if duplicates/ exists."""
    table = _read_all(storage.join(run_dir, DUPLICATES_DIR), ["image_id", "group"])
    if table is None:
        return None
    sizes = table.group_by("group").aggregate([("image_id", "count")])
    sizes = sizes.filter(pc.greater_equal(sizes.column("image_id_count"), 2))
    order = sorted(
        zip(
            sizes.column("group").to_pylist(),
            sizes.column("image_id_count").to_pylist(),
            strict=True,
        ),
        key=lambda gs: (-gs[1], gs[0]),
    )
    chosen = dict(order[:max_groups])
    members: dict[int, list[int]] = {g: [] for g in chosen}
    kept = table.filter(pc.is_in(table.column("group"), pa.array(list(chosen), pa.int64())))
    for image_id, group in zip(
        kept.column("image_id").to_pylist(), kept.column("group").to_pylist(), strict=True
    ):
        members[group].append(image_id)
    shown = [
        DuplicateGroup(g, chosen[g], [Member(i) for i in sorted(members[g])[:per_group]])
        for g, _ in order[:max_groups]
    ]
    return DuplicateSummary(len(order), int(sum(s for _, s in order)), shown)


@dataclass
class FailureSummary:
    total: int
    by_stage: list[tuple[str, int]]
    top_reasons: list[tuple[str, str, int]]  # (stage, error, count), most frequent first
    rows: list[tuple[str, str, str]]  # (uri, stage, error), at most ``max_rows``


def read_failures(run_dir: str, max_rows: int, top: int = 20) -> FailureSummary:
    table = _read_all(storage.join(run_dir, FAILURES_DIR), ["uri", "stage", "error"])
    if table is None or table.num_rows == 0:
        return FailureSummary(0, [], [], [])
    by_stage = table.group_by("stage").aggregate([("uri", "count")]).to_pylist()
    reasons = table.group_by(["stage", "error"]).aggregate([("uri", "count")]).to_pylist()
    reasons.sort(key=lambda r: (-r["uri_count"], r["stage"] or "", r["error"] or ""))
    first = table.take(pc.sort_indices(table, [("uri", "ascending")])[:max_rows])
    return FailureSummary(
        total=table.num_rows,
        by_stage=sorted(
            ((r["stage"] or "", r["uri_count"]) for r in by_stage), key=lambda s: -s[1]
        ),
        top_reasons=[(r["stage"] or "", r["error"] or "", r["uri_count"]) for r in reasons[:top]],
        rows=[(r["uri"] or "", r["stage"] or "", r["error"] or "") for r in first.to_pylist()],
    )


def count_rows(dir_uri: str) -> int:
    """Rows in a folder's committed shards, from Parquet metadata only."""
    return sum(storage.parquet_num_rows(u) for u in storage.list_shards(dir_uri))
