"""The index stage: a FAISS index sized to N, the dimension and a memory budget, in ``index/``.

- ``index/index.faiss``: Flat, HNSW, IVF-Flat or IVF-PQ (see ``factory``), trained on a seeded
  sample and filled shard by shard in one Ray task (IVF training on the node's GPUs when present);
  index row r is the r-th embedding in shard order;
- ``index/ids.parquet``: ``image_id`` and ``uri`` of index row r at row r;
- ``index/meta.json``, written last (its presence marks a complete index): type, parameters,
  metric, dimension, count, memory estimate, the default ``nprobe``/``efSearch``, the recall@10
  measured against exact search on a sample of the data, and the ``embedder`` settings, so that
  ``semclust search`` embeds a query exactly as the run did without reading the embeddings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa

from semclust import runinfo, storage
from semclust.clustering.exact import exact_topk, recall_at_k, similarity_space
from semclust.clustering.faiss_ops import (
    adopt_storage,
    claimed_cpus,
    record_failure,
    resolve_gpus,
    set_search_params,
    set_threads,
    store_index,
    unwrap_remote_errors,
)
from semclust.clustering.shards import ShardSet, embedding_shards, same_settings, sample_rows
from semclust.config import IndexConfig, RunConfig, parse_bytes
from semclust.index.factory import IndexSpec, build_index, choose_spec, train_rows_for

log = logging.getLogger(__name__)

INDEX_DIR = "index"
INDEX_FILE = "index.faiss"
FORMAT = 2  # meta.json "format": rows numbered in shard order (format 1 stored image ids)
RECALL_K = 10


def plan_index(ic: IndexConfig, n: int, dim: int, gpu: bool = False) -> IndexSpec:
    """The index type and parameters for N vectors of ``dim`` under ``ic`` (see choose_spec)."""
    return choose_spec(
        n,
        dim,
        ic.metric,
        kind=ic.type,
        memory=parse_bytes(ic.memory, "index.memory") if ic.memory else None,
        nlist=ic.nlist,
        pq_m=ic.pq_m,
        hnsw_m=ic.hnsw_m,
        ef_construction=ic.ef_construction,
        flat_max_rows=ic.flat_max_rows,
        hnsw_max_rows=ic.hnsw_max_rows,
        hnsw_max_dim=ic.hnsw_max_dim,
        gpu=gpu,
    )


def build_and_store(
    run_dir: str,
    shards: ShardSet,
    spec: IndexSpec,
    ic: IndexConfig,
    recall_queries: np.ndarray,
    s3: Any = None,
) -> dict[str, Any]:
    """Ray task body: build the index, write ``index.faiss`` and ``ids.parquet``.

    Also answers float32 (q, D) ``recall_queries`` with the stored settings, so the driver can
    score them against exact search; returns build statistics and those ids int64 (q, 10).
    """
    adopt_storage(s3)
    set_threads(claimed_cpus())
    gpus = resolve_gpus(ic.device, "index build") if spec.kind != "hnsw" else 0
    rows = train_rows_for(
        spec, shards.total, ic.train_points_per_list, parse_bytes(ic.max_train_memory)
    )
    index, stats = build_index(spec, shards, train_rows=rows, seed=ic.seed, gpus=gpus)
    index_dir = storage.join(run_dir, INDEX_DIR)
    stats["file_bytes"] = store_index(index, storage.join(index_dir, INDEX_FILE))
    id_tables = [storage.read_parquet(u, ["image_id", "uri"]) for u in shards.uris]
    storage.write_parquet(storage.join(index_dir, "ids.parquet"), pa.concat_tables(id_tables))
    stats["gpus"] = gpus
    if len(recall_queries):
        set_search_params(index, nprobe=ic.nprobe, ef_search=ic.ef_search)
        _, rows_found = index.search(similarity_space(recall_queries, spec.metric), RECALL_K)
        all_ids = np.concatenate([t.column("image_id").to_numpy() for t in id_tables])
        stats["recall_found"] = np.where(rows_found >= 0, all_ids[np.maximum(rows_found, 0)], -1)
    return stats


def run_index(cfg: RunConfig) -> dict[str, Any]:
    """Plan, build (in a Ray task) and store the index; measure its recall@10; run.json record."""
    from semclust.embed.pipeline import prepare_run_dir
    from semclust.ray_runtime import ensure_ray, use_gpu

    ic = cfg.index
    run_dir = cfg.run_dir
    if not run_dir:
        raise ValueError("no run directory given: pass --run-dir")
    start = time.perf_counter()
    shards = embedding_shards(run_dir)
    embedder = runinfo.load(run_dir).get("stages", {}).get("embed", {}).get("embedder")
    if not embedder:
        raise ValueError(
            f"{run_dir!r} has no finished embed stage in run.json; run `semclust embed`"
        )
    prepare_run_dir(run_dir, cfg.mode, "index")
    ensure_ray(cfg.ray)
    gpu = use_gpu(ic.device)
    # Planned before anything is written: a budget no index fits stops here.
    spec = plan_index(ic, shards.total, shards.dim, gpu)
    index_dir = storage.join(run_dir, INDEX_DIR)
    meta_uri = storage.join(index_dir, "meta.json")
    settings = {"index": asdict(ic), "embeddings": shards.fingerprint(), "embedder": embedder}
    previous = runinfo.load(run_dir).get("stages", {}).get("index", {})
    if (
        same_settings(run_dir, "index", settings, cfg.mode)
        and previous.get("status") == "done"
        and storage.exists(meta_uri)
    ):
        log.info("index: already built with the same settings on the same embeddings")
        return previous
    # The old marker goes first, then the files: a crash leaves no meta.json, so no "index".
    storage.remove_tree(meta_uri)
    storage.remove_tree(index_dir)
    runinfo.update_stage(
        run_dir, "index", {"status": "running", "settings": settings}, cfg.to_dict()
    )
    with record_failure(run_dir, "index", settings, cfg.to_dict()):
        meta = _build(cfg, shards, spec, embedder)
    record = {key: value for key, value in meta.items() if key != "embedder"}
    record.update(status="done", settings=settings, seconds=round(time.perf_counter() - start, 3))
    runinfo.update_stage(run_dir, "index", record, cfg.to_dict())
    return record


@unwrap_remote_errors
def _build(
    cfg: RunConfig, shards: ShardSet, spec: IndexSpec, embedder: dict[str, Any]
) -> dict[str, Any]:
    import ray

    from semclust.clustering.faiss_ops import task_resources

    ic = cfg.index
    run_dir = cfg.run_dir
    assert run_dir is not None
    queries = sample_rows(shards, min(ic.recall_sample, shards.total), ic.seed + 1)
    if spec.kind == "flat":  # exact by construction: no need to measure
        queries = queries[:0]
    with runinfo.timed(f"index build ({spec.factory})") as build_time:
        task = ray.remote(build_and_store).options(**task_resources(ic.device, ic.num_cpus))
        stats = ray.get(task.remote(run_dir, shards, spec, ic, queries, storage.s3_options()))
    recall: float | None = 1.0 if spec.kind == "flat" else None
    if "recall_found" in stats:
        truth, _ = exact_topk(shards.uris, queries, RECALL_K, ic.metric)
        recall = round(recall_at_k(stats.pop("recall_found"), truth), 5)
    budget = parse_bytes(ic.memory) if ic.memory else None
    meta = {
        "format": FORMAT,
        "type": spec.kind,
        "factory": spec.factory,
        "metric": ic.metric,
        "dim": shards.dim,
        "count": shards.total,
        "spec": spec.to_dict(),
        "nprobe": ic.nprobe if spec.kind.startswith("ivf") else None,
        "ef_search": ic.ef_search if spec.kind == "hnsw" else None,
        "memory_estimate_bytes": spec.memory_bytes(shards.total),
        "memory_budget_bytes": budget,
        "recall_at_10": recall,
        "recall_queries": len(queries),
        "build": {**stats, "seconds": build_time["seconds"]},
        "embedder": embedder,
    }
    # meta.json last: its presence marks a complete index.
    storage.write_json(storage.join(run_dir, INDEX_DIR, "meta.json"), meta)
    return meta
