"""The index stage: a FAISS index sized to N, the dimension and a memory budget, in ``index/``.

- ``index/index.faiss``: Flat, HNSW, IVF-Flat or IVF-PQ (see ``factory``), trained on a seeded
  sample and filled shard by shard in one Ray task (IVF training on the node's GPUs when present);
  index row r is the r-th embedding in shard order;
- ``index/ids.parquet``: ``image_id`` and ``uri`` of index row r at row r;
- ``index/meta.json``, written last (its presence marks a complete index): type, parameters,
  metric, dimension, count, memory estimate, the default ``nprobe``/``efSearch``, the recall@10
  measured against exact search on a sample of the data, and the ``embedder`` settings, so that
  ``semclust search`` embeds a query exactly as the run did without reading the embeddings.

The index is planned in ``settings``: a budget no index fits stops the stage before anything is
written.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa

from semclust import runinfo, storage
from semclust.config import IndexConfig, parse_bytes
from semclust.context import RunContext
from semclust.errors import UserError
from semclust.index.exact import exact_topk, recall_at_k, similarity_space
from semclust.index.factory import IndexSpec, build_index, choose_spec, train_rows_for
from semclust.index.faiss_ops import (
    claimed_cpus,
    resolve_gpus,
    set_search_params,
    set_threads,
    store_index,
    task_resources,
)
from semclust.rundir.embeddings import ShardSet, sample_rows
from semclust.rundir.layout import INDEX
from semclust.rundir.tables import INDEX_FILE, INDEX_FORMAT, INDEX_IDS, INDEX_META, index_file

log = logging.getLogger(__name__)

RECALL_K = 10


def settings(ctx: RunContext) -> dict[str, Any]:
    """The index section, the embeddings' fingerprint and the run's embedder; the index is
    planned here, so that a memory budget no index fits stops before anything is written."""
    embedder = _embedder(ctx)
    plan(ctx)
    shards = ctx.embeddings()
    return {
        "index": asdict(ctx.cfg.index),
        "embeddings": shards.fingerprint(),
        "embedder": embedder,
    }


def run(ctx: RunContext) -> dict[str, Any]:
    """Build (in a Ray task) and store the index, measure its recall@10; the run.json record."""
    run_dir = ctx.run_dir
    meta_uri = index_file(run_dir, INDEX_META)
    if ctx.resumable and ctx.previous.get("status") == "done" and storage.exists(meta_uri):
        log.info("index: already built with the same settings on the same embeddings")
        return ctx.previous
    # The old marker goes first, then the files: a crash leaves no meta.json, so no "index".
    storage.remove_tree(meta_uri)
    storage.remove_tree(storage.join(run_dir, INDEX))
    ctx.ensure_held()
    meta = _build(ctx, plan(ctx), ctx.settings["embedder"])
    return {key: value for key, value in meta.items() if key != "embedder"}


def summary(record: dict[str, Any]) -> str:
    line = f"{record.get('factory', record['type'])} {record['metric']}, {record['count']} vectors"
    if record.get("recall_at_10") is not None:
        line += f", recall@10 {record['recall_at_10']}"
    return line


def plan(ctx: RunContext) -> IndexSpec:
    """The index type and parameters for the run's embeddings under the ``index`` section (see
    ``factory.choose_spec``); ``UserError`` when the memory budget fits none."""
    from semclust.ray_runtime import use_gpu

    ic = ctx.cfg.index
    shards = ctx.embeddings()
    ctx.start_ray()  # whether the cluster has GPUs decides between HNSW and IVF
    return choose_spec(
        shards.total,
        shards.dim,
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
        gpu=use_gpu(ic.device),
    )


def _embedder(ctx: RunContext) -> dict[str, Any]:
    """The embed stage's ``embedder`` record (how a query must be embedded)."""
    embed = runinfo.load(ctx.run_dir).get("stages", {}).get("embed", {})
    embedder: dict[str, Any] | None = embed.get("embedder")
    if not embedder:
        raise UserError(
            f"{ctx.run_dir!r} has no finished embed stage in run.json; run `semclust embed`"
        )
    return embedder


def _build(ctx: RunContext, spec: IndexSpec, embedder: dict[str, Any]) -> dict[str, Any]:
    """Build and store the index in one Ray task, score it; its meta.json (written last)."""
    ic = ctx.cfg.index
    shards = ctx.embeddings()
    queries = sample_rows(shards, min(ic.recall_sample, shards.total), ic.seed + 1)
    if spec.kind == "flat":  # exact by construction: no need to measure
        queries = queries[:0]
    with runinfo.timed(f"index build ({spec.factory})") as build_time:
        task = ctx.remote(build_and_store, **task_resources(ic.device, ic.num_cpus))
        stats = ctx.start_ray().get(task.remote(ctx.run_dir, shards, spec, ic, queries))
    recall: float | None = 1.0 if spec.kind == "flat" else None
    if "recall_found" in stats:
        truth, _ = exact_topk(ctx, shards.uris, queries, RECALL_K, ic.metric)
        recall = round(recall_at_k(stats.pop("recall_found"), truth), 5)
    meta = {
        "format": INDEX_FORMAT,
        "type": spec.kind,
        "factory": spec.factory,
        "metric": ic.metric,
        "dim": shards.dim,
        "count": shards.total,
        "spec": spec.to_dict(),
        "nprobe": ic.nprobe if spec.kind.startswith("ivf") else None,
        "ef_search": ic.ef_search if spec.kind == "hnsw" else None,
        "memory_estimate_bytes": spec.memory_bytes(shards.total),
        "memory_budget_bytes": parse_bytes(ic.memory) if ic.memory else None,
        "recall_at_10": recall,
        "recall_queries": len(queries),
        "build": {**stats, "seconds": build_time["seconds"]},
        "embedder": embedder,
    }
    ctx.ensure_held()
    storage.write_json(index_file(ctx.run_dir, INDEX_META), meta)  # last: the index is complete
    return meta


def build_and_store(
    run_dir: str,
    shards: ShardSet,
    spec: IndexSpec,
    ic: IndexConfig,
    recall_queries: np.ndarray,
) -> dict[str, Any]:
    """Ray task body: build the index, write ``index.faiss`` and ``ids.parquet``.

    Also answers float32 (q, D) ``recall_queries`` with the stored settings, so the driver can
    score them against exact search; returns build statistics and those ids int64 (q, 10).
    """
    set_threads(claimed_cpus())
    gpus = resolve_gpus(ic.device, "index build") if spec.kind != "hnsw" else 0
    rows = train_rows_for(
        spec, shards.total, ic.train_points_per_list, parse_bytes(ic.max_train_memory)
    )
    index, stats = build_index(spec, shards, train_rows=rows, seed=ic.seed, gpus=gpus)
    stats["file_bytes"] = store_index(index, index_file(run_dir, INDEX_FILE))
    id_tables = [storage.read_parquet(u, ["image_id", "uri"]) for u in shards.uris]
    storage.write_parquet(index_file(run_dir, INDEX_IDS), pa.concat_tables(id_tables))
    stats["gpus"] = gpus
    if len(recall_queries):
        set_search_params(index, nprobe=ic.nprobe, ef_search=ic.ef_search)
        _, rows_found = index.search(similarity_space(recall_queries, spec.metric), RECALL_K)
        all_ids = np.concatenate([t.column("image_id").to_numpy() for t in id_tables])
        stats["recall_found"] = np.where(rows_found >= 0, all_ids[np.maximum(rows_found, 0)], -1)
    return stats
