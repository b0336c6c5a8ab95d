"""The cluster stage: FAISS k-means on a sample, then every row assigned shard by shard in Ray.

Training runs in one Ray task (all GPUs of a node when there are any, else its CPUs): it draws a
seeded sample of at most ``max_points_per_centroid * k`` rows shard by shard, learns the optional
PCA/whitening, chooses k (``k=auto``, ``select_k``), runs k-means (``kmeans``) and writes
``model/`` (``model``), ``kmeans.json`` last. Assignment runs in Ray actors (``assign``), one
``assignments/`` part per embeddings shard.

Resume: with the same settings a complete model is kept and only missing parts are assigned;
other settings clear the model and the parts first, so two clusterings never mix.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from semclust import runinfo, storage
from semclust.clustering import model as model_files
from semclust.clustering.assign import assign_shards
from semclust.clustering.kmeans import train_kmeans
from semclust.clustering.select_k import select_k
from semclust.config import ClusterConfig, parse_bytes
from semclust.context import RunContext
from semclust.errors import UserError
from semclust.index.faiss_ops import claimed_cpus, resolve_gpus, set_threads, task_resources
from semclust.rundir.embeddings import ShardSet, sample_rows, sample_size
from semclust.rundir.layout import ASSIGNMENTS, MODEL
from semclust.rundir.tables import part_uri

log = logging.getLogger(__name__)


def settings(ctx: RunContext) -> dict[str, Any]:
    """The cluster section and the embeddings' fingerprint; k and pca_dim checked against the
    embeddings."""
    cc = ctx.cfg.cluster
    shards = ctx.embeddings()
    if cc.k != "auto" and int(cc.k) > shards.total:
        raise UserError(
            f"cluster.k={cc.k} is larger than the {shards.total} embedded images; choose "
            f"--k {shards.total} or less"
        )
    if cc.k == "auto" and cc.k_min >= shards.total:
        raise UserError(
            f"cluster.k=auto: k_min={cc.k_min} needs more than the {shards.total} embedded images"
        )
    if cc.pca_dim is not None and cc.pca_dim > shards.dim:
        raise UserError(
            f"cluster.pca_dim={cc.pca_dim} is larger than the embedding dimension {shards.dim}"
        )
    return {"cluster": asdict(cc), "embeddings": shards.fingerprint()}


def run(ctx: RunContext) -> dict[str, Any]:
    """Train (or keep) the model, assign the shards without a part; the run.json record."""
    from semclust.ray_runtime import use_gpu

    cc = ctx.cfg.cluster
    run_dir = ctx.run_dir
    shards = ctx.embeddings()
    ray = ctx.start_ray()
    reuse = ctx.resumable and model_files.is_complete(run_dir)
    if reuse:
        trained = model_files.read_summary(run_dir)
        log.info("cluster: reusing the model in %s (same settings)", storage.join(run_dir, MODEL))
    else:
        # A model or parts from other settings would mix two clusterings: clear them first.
        storage.remove_tree(storage.join(run_dir, MODEL))
        storage.remove_tree(storage.join(run_dir, ASSIGNMENTS))
        ctx.ensure_held()
        train = ctx.remote(train_and_save, **task_resources(cc.device, cc.train_num_cpus))
        trained = ray.get(train.remote(run_dir, shards, cc))
    k = int(trained["k"])

    def out_uri(uri: str) -> str:
        return part_uri(run_dir, ASSIGNMENTS, uri)

    done = set(storage.list_shards(storage.join(run_dir, ASSIGNMENTS))) if reuse else set()
    pending = [u for u in shards.uris if out_uri(u) not in done]
    sizes, assigned = _sizes_of([out_uri(u) for u in shards.uris if out_uri(u) in done], k)
    with runinfo.timed("assignment") as assign_time:
        if pending:
            ctx.ensure_held()
            new_sizes, new_rows = assign_shards(ctx, cc, k, pending, out_uri, use_gpu(cc.device))
            sizes, assigned = sizes + new_sizes, assigned + new_rows
    if assigned != shards.total:
        raise RuntimeError(f"assigned {assigned} rows but the shards hold {shards.total}")
    rows_of = dict(zip(shards.uris, shards.rows, strict=True))
    return {
        **{key: value for key, value in trained.items() if key != "settings"},
        "rows": assigned,
        "assigned_this_run": int(sum(rows_of[u] for u in pending)),
        "device": "gpu" if trained.get("gpus") else "cpu",
        "cluster_sizes": {
            "min": int(sizes.min()),
            "max": int(sizes.max()),
            "empty": int((sizes == 0).sum()),
        },
        "assign_seconds": assign_time["seconds"],
    }


def summary(record: dict[str, Any]) -> str:
    return f"k={record['k']}, sizes {record['cluster_sizes']}"


def _sizes_of(part_uris: list[str], k: int) -> tuple[np.ndarray, int]:
    """(cluster sizes int64 (k,), rows) of committed assignments parts."""
    sizes = np.zeros(k, dtype=np.int64)
    rows = 0
    for uri in part_uris:
        clusters = storage.read_parquet(uri, ["cluster"])["cluster"].to_numpy()
        sizes += np.bincount(clusters, minlength=k)
        rows += len(clusters)
    return sizes, rows


def train_and_save(run_dir: str, shards: ShardSet, cc: ClusterConfig) -> dict[str, Any]:
    """Ray task body: sample, (select k,) train, write ``model/`` with ``kmeans.json`` last;
    returns the training summary."""
    set_threads(claimed_cpus())
    gpus = resolve_gpus(cc.device, "cluster training")
    max_bytes = parse_bytes(cc.max_sample_memory)
    selection = None
    start = time.perf_counter()
    if cc.k == "auto":
        rows = sample_size(cc.k_sample, shards.dim, max_bytes)
        k, selection = select_k(sample_rows(shards, rows, cc.seed), cc, gpus)
        storage.write_json(model_files.model_file(run_dir, model_files.K_SELECTION), selection)
    else:
        k = int(cc.k)
    select_seconds = round(time.perf_counter() - start, 3)
    wanted = cc.max_points_per_centroid * k
    rows = sample_size(wanted, shards.dim, max_bytes)
    if rows < min(wanted, shards.total):
        log.warning(
            "k-means sample capped at %d rows by cluster.max_sample_memory=%s (wanted %d)",
            rows,
            cc.max_sample_memory,
            wanted,
        )
    start = time.perf_counter()
    sample = sample_rows(shards, rows, cc.seed)
    sampled = time.perf_counter()
    model, trained = train_kmeans(sample, cc, gpus, k)
    trained["train_seconds"] = round(time.perf_counter() - start, 3)
    trained["timings"] = {"sample_s": round(sampled - start, 3), **trained["timings"]}
    if selection is not None:
        trained["k_selection"] = {
            key: selection[key] for key in ("chosen_k", "best_silhouette_k", "elbow_k")
        }
        trained["k_selection_seconds"] = select_seconds
    trained["settings"] = asdict(cc)
    model.save(run_dir)
    model_files.save_summary(run_dir, trained)
    return trained
