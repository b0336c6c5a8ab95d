"""The cluster stage: FAISS k-means on a sample, then every row assigned shard by shard in Ray.

Writes ``model/centroids.npy`` (float32 (k, D)), ``model/kmeans.json`` and
``assignments/part-NNNNN.parquet`` (one per embeddings shard, same part number) with
``image_id``, ``cluster``/``distance`` (nearest centroid) and ``cluster_2nd``/``distance_2nd``.
Distances are squared L2; with spherical k-means the rows are L2-normalised first, so a distance
is ``2 - 2 cos``.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from semclust import runinfo, storage
from semclust.clustering.shards import (
    check_finite,
    embedding_shards,
    normalize_rows,
    sample_rows,
)
from semclust.config import ClusterConfig, RunConfig
from semclust.embed.pipeline import read_embeddings

log = logging.getLogger(__name__)

MODEL_DIR = "model"
ASSIGNMENTS_DIR = "assignments"

ASSIGNMENTS_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("cluster", pa.int32()),
        ("distance", pa.float32()),
        ("cluster_2nd", pa.int32()),
        ("distance_2nd", pa.float32()),
    ]
)


def train_kmeans(
    sample: np.ndarray, cc: ClusterConfig, gpus: int = 0
) -> tuple[np.ndarray, dict[str, Any]]:
    """FAISS k-means on float32 (n, D) rows; returns centroids float32 (k, D) and a summary."""
    import faiss

    n, dim = sample.shape
    if cc.k > n:
        raise ValueError(
            f"cluster.k={cc.k} is larger than the {n} rows to cluster; choose k <= {n}"
        )
    x = normalize_rows(sample) if cc.spherical else sample
    km = faiss.Kmeans(
        dim,
        cc.k,
        niter=cc.niter,
        nredo=cc.nredo,
        spherical=cc.spherical,
        seed=cc.seed,
        max_points_per_centroid=cc.max_points_per_centroid,
        gpu=gpus if gpus > 0 else False,
        verbose=False,
    )
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    summary = {
        "k": cc.k,
        "dim": dim,
        "metric": "spherical (inner product on L2-normalised rows)" if cc.spherical else "l2",
        "iterations": cc.niter,
        "nredo": cc.nredo,
        "objective": float(km.obj[-1]) if len(km.obj) else None,
        "trained_on": n,
        "seed": cc.seed,
        "gpus": gpus,
    }
    return np.asarray(km.centroids, dtype=np.float32), summary


def assign(
    vectors: np.ndarray, centroids: np.ndarray, spherical: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Two nearest centroids of each row: (clusters int64 (n, 2), squared L2 float32 (n, 2))."""
    import faiss

    x = normalize_rows(vectors) if spherical else vectors
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    distances, labels = index.search(np.ascontiguousarray(x, dtype=np.float32), 2)
    return labels, distances


def assign_shard(shard_uri: str, run_dir: str, spherical: bool, threads: int) -> dict[str, Any]:
    """Read one embeddings shard and the model from the run dir, write its assignments shard."""
    import faiss

    faiss.omp_set_num_threads(threads)
    centroids = np.load(
        io.BytesIO(storage.read_bytes(storage.join(run_dir, MODEL_DIR, "centroids.npy")))
    )
    ids, vectors = read_embeddings(shard_uri)
    check_finite(vectors, shard_uri)
    labels, distances = assign(vectors, centroids, spherical)
    table = pa.table(
        {
            "image_id": pa.array(ids, pa.int64()),
            "cluster": pa.array(labels[:, 0].astype(np.int32)),
            "distance": pa.array(distances[:, 0].astype(np.float32)),
            "cluster_2nd": pa.array(labels[:, 1].astype(np.int32)),
            "distance_2nd": pa.array(distances[:, 1].astype(np.float32)),
        },
        schema=ASSIGNMENTS_SCHEMA,
    )
    name = shard_uri.rsplit("/", 1)[-1]
    storage.write_parquet(storage.join(run_dir, ASSIGNMENTS_DIR, name), table)
    return {"rows": len(ids), "sizes": np.bincount(labels[:, 0], minlength=len(centroids))}


def run_cluster(cfg: RunConfig) -> dict[str, Any]:
    """Train on a sample, assign every shard in Ray tasks; returns the run.json record."""
    import ray

    from semclust.embed.pipeline import prepare_run_dir
    from semclust.ray_runtime import ensure_ray, local_faiss_gpus, use_gpu

    cc = cfg.cluster
    run_dir = cfg.run_dir
    if not run_dir:
        raise ValueError("no run directory given: pass --run-dir")
    start = time.perf_counter()
    shards = embedding_shards(run_dir)
    if cc.k > shards.total:
        raise ValueError(
            f"cluster.k={cc.k} is larger than the {shards.total} embedded images; choose "
            f"--k {shards.total} or less"
        )
    prepare_run_dir(run_dir, cfg.mode, "cluster")
    ensure_ray(cfg.ray)
    gpus = local_faiss_gpus() if use_gpu(cc.device) else 0
    with runinfo.timed("k-means training") as train_time:
        sample = sample_rows(shards, cc.max_points_per_centroid * cc.k, cc.seed)
        centroids, summary = train_kmeans(sample, cc, gpus)
    buf = io.BytesIO()
    np.save(buf, centroids)
    storage.write_bytes(storage.join(run_dir, MODEL_DIR, "centroids.npy"), buf.getvalue())
    storage.write_json(storage.join(run_dir, MODEL_DIR, "kmeans.json"), summary)

    # Stale shards from an earlier k would mix two models: clear them before assigning.
    storage.remove_tree(storage.join(run_dir, ASSIGNMENTS_DIR))
    remote = ray.remote(num_cpus=1)(assign_shard)
    with runinfo.timed("assignment") as assign_time:
        results = ray.get([remote.remote(u, run_dir, cc.spherical, 1) for u in shards.uris])
    sizes = np.sum([r["sizes"] for r in results], axis=0)
    assigned = int(sum(r["rows"] for r in results))
    if assigned != shards.total:
        raise RuntimeError(f"assigned {assigned} rows but the shards hold {shards.total}")
    record = {
        **summary,
        "rows": assigned,
        "cluster_sizes": {
            "min": int(sizes.min()),
            "max": int(sizes.max()),
            "empty": int((sizes == 0).sum()),
        },
        "train_seconds": train_time["seconds"],
        "assign_seconds": assign_time["seconds"],
        "seconds": round(time.perf_counter() - start, 3),
    }
    runinfo.update_stage(run_dir, "cluster", record, cfg.to_dict())
    return record


def read_assignments(run_dir: str) -> pa.Table:
    """All assignments rows (image_id, cluster, ...); for evaluation and small runs."""
    uris = storage.list_shards(storage.join(run_dir, ASSIGNMENTS_DIR))
    if not uris:
        raise ValueError(f"no assignments in {run_dir!r}: run `semclust cluster` first")
    return pa.concat_tables([storage.read_parquet(u) for u in uris])
