"""What the report shows, read from a run directory without gathering every row on the driver.

Per-cluster figures come from the assignments shards, summarised shard by shard in Ray tasks:
counts, summed distances, the rows nearest each centroid and a seeded random sample (see
:mod:`semclust.report.sampling`). Only the few images the report shows are then looked up in the
embeddings shards (URI and size), together with the embeddings of the map sample.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semclust import storage
from semclust.errors import UserError
from semclust.report.sampling import hash_key, key_threshold, smallest_per_group
from semclust.rundir.frames import read_with_frame_times
from semclust.rundir.layout import ASSIGNMENTS, EMBEDDINGS

log = logging.getLogger(__name__)

# ``RunContext.remote``: (function, **Ray options) -> a Ray remote function that runs under the
# run's storage settings on whichever node Ray picks.
Remote = Callable[..., Any]

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
        "frame_time": [],
        "map_id": ids[on_map],
        "map_vec": None,
    }
    if want.any():
        columns = ["uri", "width", "height"]
        meta = read_with_frame_times(shard_uri, columns).filter(pa.array(want))
        out["uri"] = meta.column("uri").to_pylist()
        out["width"] = meta.column("width").to_numpy().astype(np.int32)
        out["height"] = meta.column("height").to_numpy().astype(np.int32)
        out["frame_time"] = meta.column("frame_time").to_pylist()
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
    frame_time: float | None = None  # a video frame's time (seconds); None for a still image
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


def run_tasks(task: Any, calls: Sequence[tuple[Any, ...]], what: str) -> list[Any]:
    """``task.remote(*args)`` (a Ray remote function) for every call, logging progress; the
    results in call order."""
    import ray

    futures = [task.remote(*args) for args in calls]
    index = {f: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    pending = list(futures)
    last_log = time.monotonic()
    while pending:
        # Whatever is done within a second: one wait per result would scan every pending
        # reference each time, quadratic in the 39,000 shards of a 10^7-row run.
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        for f in done:
            results[index[f]] = ray.get(f)
        if time.monotonic() - last_log > 5 or not pending:
            log.info("%s: %d/%d", what, len(futures) - len(pending), len(futures))
            last_log = time.monotonic()
    return results


def summarize_assignments(
    run_dir: str,
    k: int,
    n_nearest: int,
    n_sample: int,
    map_sample: int,
    seed: int,
    *,
    remote: Remote,
) -> AssignmentSummary:
    """Summarise every assignments shard in Ray tasks (made by ``remote``) and merge the
    candidates: the same result for any number and order of shards."""
    shards = storage.list_shards(storage.join(run_dir, ASSIGNMENTS))
    if not shards:
        raise UserError(
            f"no assignments in {run_dir!r}: run `semclust cluster` (or `semclust run`) before "
            "`semclust report`"
        )
    total = sum(storage.parquet_num_rows(u) for u in shards)
    fraction = _MAP_OVERSAMPLE * map_sample / max(total, 1)
    # The random sample excludes the nearest rows: keep enough candidates to drop them later.
    n_random = n_sample + n_nearest if n_sample else 0
    parts = run_tasks(
        remote(summarize_assignments_shard, num_cpus=1),
        [(u, k, n_nearest, n_random, seed, fraction) for u in shards],
        "report: summarising assignments shards",
    )
    cat = {key: np.concatenate([p[key] for p in parts]) for key in parts[0] if key != "rows"}
    rows = int(sum(int(p["rows"]) for p in parts))
    if rows != total:
        raise RuntimeError(f"read {rows} assignment rows but the shard metadata says {total}")
    nearest, sample = _galleries(cat, k, n_nearest, n_sample, n_random)
    order = np.lexsort((cat["map_id"], cat["map_key"]))[:map_sample]
    return AssignmentSummary(
        k=k,
        rows=rows,
        counts=np.sum([p["counts"] for p in parts], axis=0),
        dist_sum=np.sum([p["dist_sum"] for p in parts], axis=0),
        nearest=nearest,
        sample=sample,
        map_ids=cat["map_id"][order],
        map_clusters=cat["map_cluster"][order],
    )


def _galleries(
    cat: dict[str, np.ndarray], k: int, n_nearest: int, n_sample: int, n_random: int
) -> tuple[dict[int, list[Member]], dict[int, list[Member]]]:
    """(nearest, sample) per cluster from the shards' merged candidates."""
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
    return nearest, sample


@dataclass
class EmbeddingLookup:
    """URIs and sizes of the shown images, and the map sample's embeddings."""

    meta: dict[int, tuple[str, int, int, float | None]]  # id -> (uri, width, height, frame_time)
    map_ids: np.ndarray  # int64 (m,)
    map_vectors: np.ndarray  # float32 (m, D)


def lookup_embeddings(
    run_dir: str, wanted_ids: set[int], map_ids: np.ndarray, *, remote: Remote
) -> EmbeddingLookup:
    """Look the shown images and the map sample up in every embeddings shard, in Ray tasks."""
    import ray

    shards = storage.list_shards(storage.join(run_dir, EMBEDDINGS))
    if not shards:
        raise UserError(f"no embeddings in {run_dir!r}: run `semclust embed` first")
    task = remote(lookup_embeddings_shard, num_cpus=1)  # joins Ray before the puts below
    wanted_ref = ray.put(np.array(sorted(wanted_ids), dtype=np.int64))
    map_ref = ray.put(np.asarray(map_ids, dtype=np.int64))
    parts = run_tasks(
        task,
        [(u, wanted_ref, map_ref) for u in shards],
        "report: looking up images and the map sample in embeddings shards",
    )
    meta: dict[int, tuple[str, int, int, float | None]] = {}
    for p in parts:
        rows = zip(p["id"], p["uri"], p["width"], p["height"], p["frame_time"], strict=True)
        for image_id, uri, w, h, t in rows:
            meta[int(image_id)] = (uri, int(w), int(h), t)
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


def count_rows(dir_uri: str) -> int:
    """Rows in a folder's committed shards, from Parquet metadata only."""
    return sum(storage.parquet_num_rows(u) for u in storage.list_shards(dir_uri))
