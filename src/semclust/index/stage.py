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

import contextlib
import logging
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa

from semclust import runinfo, storage
from semclust.config import IndexConfig, parse_bytes
from semclust.context import RunContext
from semclust.errors import UserError
from semclust.index.exact import drop_self, exact_topk, recall_at_k, similarity_space
from semclust.index.factory import (
    IndexSpec,
    build_index,
    choose_spec,
    depth_name,
    depth_steps,
    train_rows_for,
)
from semclust.index.faiss_ops import (
    claimed_cpus,
    resolve_gpus,
    set_search_params,
    set_threads,
    store_index,
    task_resources,
)
from semclust.index.rerank import load_vectors, search_rows, vectors_writer
from semclust.rundir import schemas
from semclust.rundir.embeddings import ShardSet, sample_rows
from semclust.rundir.frames import read_with_frame_times
from semclust.rundir.layout import INDEX
from semclust.rundir.tables import (
    INDEX_FILE,
    INDEX_FORMAT,
    INDEX_IDS,
    INDEX_META,
    INDEX_RERANK,
    index_file,
)

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


_UNTUNED_DEPTH = {"nprobe": 16, "ef_search": 64}  # without a recall sample to tune on


def _without_self(query_ids: np.ndarray, found: np.ndarray, sims: np.ndarray) -> np.ndarray:
    """The 10 nearest other images of each sampled row, from its (q, 11) results: the samples
    are rows of the index, so each usually finds itself, which a query from outside would not;
    it goes (where it is missing, the weakest hit goes)."""
    return drop_self(query_ids, found, sims, RECALL_K)[0]


def _build(ctx: RunContext, spec: IndexSpec, embedder: dict[str, Any]) -> dict[str, Any]:
    """Build and store the index in one Ray task, tune its default search depth and score it;
    its meta.json (written last).

    Two disjoint seeded samples of rows: the depth (nprobe / efSearch) is the smallest of
    ``depth_steps`` whose recall@10 on the first reaches ``index.target_recall``; the recall
    recorded is the second's, held out. Their exact neighbours are computed before the build
    task claims the CPUs.
    """
    ic = ctx.cfg.index
    shards = ctx.embeddings()
    depth = depth_name(spec)
    fixed = {"nprobe": ic.nprobe, "ef_search": ic.ef_search}.get(depth or "")
    sample = 0 if spec.kind == "flat" else min(ic.recall_sample, shards.total // 2)
    query_ids = np.zeros(0, dtype=np.int64)
    queries = np.zeros((0, shards.dim), dtype=np.float32)
    truth = np.zeros((0, RECALL_K), dtype=np.int64)
    if sample:
        ids, rows = sample_rows(shards, 2 * sample, ic.seed + 1, with_ids=True)
        # Disjoint halves, tuning first then held out, each in shard order.
        order = np.random.default_rng(ic.seed).permutation(len(rows))
        pick = np.concatenate([np.sort(order[:sample]), np.sort(order[sample:])])
        query_ids, queries = ids[pick], rows[pick]
        with runinfo.timed("index exact neighbours of the recall samples"):
            found, sims = exact_topk(ctx, shards.uris, queries, RECALL_K + 1, ic.metric)
            truth = _without_self(query_ids, found, sims)
    if depth is None:
        depths: list[int] = []
    elif fixed is not None:
        depths = [fixed]
    elif sample:
        depths = depth_steps(spec)
    else:
        depths = [_UNTUNED_DEPTH[depth]]
    rerank_file = ic.rerank and spec.kind == "ivf_pq"
    probe = {"ids": query_ids, "queries": queries, "truth": truth, "tune": sample}
    probe["depths"] = depths
    with runinfo.timed(f"index build ({spec.factory})") as build_time:
        task = ctx.remote(build_and_store, **task_resources(ic.device, ic.num_cpus))
        stats = ctx.start_ray().get(task.remote(ctx.run_dir, shards, spec, ic, probe, rerank_file))
    tuned = stats.pop("tuned", {})
    meta = {
        "format": INDEX_FORMAT,
        "type": spec.kind,
        "factory": spec.factory,
        "metric": ic.metric,
        "dim": shards.dim,
        "count": shards.total,
        "spec": spec.to_dict(),
        "nprobe": tuned.get("depth") if depth == "nprobe" else None,
        "ef_search": tuned.get("depth") if depth == "ef_search" else None,
        "tuning": {
            "chosen_by": "config" if fixed else ("target_recall" if sample else "default"),
            "target_recall": ic.target_recall,
            "tried": tuned.get("tried", []),
        }
        if depth
        else None,
        "rerank": {"file": INDEX_RERANK, "factor": ic.rerank_factor} if rerank_file else None,
        "memory_estimate_bytes": spec.memory_bytes(shards.total),
        "memory_budget_bytes": parse_bytes(ic.memory) if ic.memory else None,
        "disk_bytes": stats.get("file_bytes", 0) + stats.get("rerank_bytes", 0),
        "recall_at_10": 1.0 if spec.kind == "flat" else tuned.get("held_recall"),
        "recall_at_10_without_rerank": tuned.get("held_recall_without_rerank"),
        "recall_queries": len(queries) - sample,
        "latency_ms": tuned.get("latency_ms"),
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
    probe: dict[str, Any],
    rerank_file: bool,
) -> dict[str, Any]:
    """Ray task body: build the index, write ``index.faiss``, ``ids.parquet`` and with
    ``rerank_file`` the float16 re-rank vectors; then tune the search depth on the probe's
    queries (``tune_depth``). Returns build statistics with ``tuned``."""
    set_threads(claimed_cpus())
    gpus = resolve_gpus(ic.device, "index build") if spec.kind != "hnsw" else 0
    rows = train_rows_for(
        spec, shards.total, ic.train_points_per_list, parse_bytes(ic.max_train_memory)
    )
    uri = index_file(run_dir, INDEX_RERANK)
    with contextlib.ExitStack() as stack:
        vectors = None
        if rerank_file:
            vectors = stack.enter_context(vectors_writer(uri, shards.total, spec.dim))
        start = [0]

        def keep(_ids: np.ndarray, x: np.ndarray) -> None:
            if vectors is not None:
                vectors[start[0] : start[0] + len(x)] = x
            start[0] += len(x)

        index, stats = build_index(
            spec, shards, train_rows=rows, seed=ic.seed, gpus=gpus, on_shard=keep
        )
    stats["file_bytes"] = store_index(index, index_file(run_dir, INDEX_FILE))
    id_tables = [
        read_with_frame_times(u, ["image_id", "uri"]).cast(schemas.INDEX_IDS) for u in shards.uris
    ]
    storage.write_parquet(index_file(run_dir, INDEX_IDS), pa.concat_tables(id_tables))
    stats["gpus"] = gpus
    reranker = None
    if rerank_file:
        stats["rerank_bytes"] = 2 * spec.dim * shards.total
        reranker = load_vectors(uri), ic.rerank_factor
    if probe["depths"]:
        all_ids = np.concatenate([t.column("image_id").to_numpy() for t in id_tables])
        stats["tuned"] = tune_depth(index, spec, probe, all_ids, ic.target_recall, reranker)
    return stats


def tune_depth(
    index: Any,
    spec: IndexSpec,
    probe: dict[str, Any],
    ids: np.ndarray,
    target: float,
    reranker: tuple[Any, int] | None,
) -> dict[str, Any]:
    """Try the probe's depths in order on its tuning queries and keep the first whose recall@10
    reaches ``target`` (else the last); then measure on the held-out queries the recall (with
    and without re-ranking) and the latency at that depth."""
    name = depth_name(spec)
    cut = probe["tune"]
    tune, held = probe["queries"][:cut], probe["queries"][cut:]
    tune_ids, held_ids = probe["ids"][:cut], probe["ids"][cut:]
    tune_truth, held_truth = probe["truth"][:cut], probe["truth"][cut:]
    vectors, factor = reranker if reranker is not None else (None, 1)

    def found(queries: np.ndarray, query_ids: np.ndarray, with_rerank: bool = True) -> np.ndarray:
        x = similarity_space(queries, spec.metric)
        k = RECALL_K + 1
        rows, sims = search_rows(index, spec, x, k, vectors if with_rerank else None, factor)
        return _without_self(query_ids, np.where(rows >= 0, ids[np.maximum(rows, 0)], -1), sims)

    tried: list[list[float]] = []
    for depth in probe["depths"]:
        set_search_params(index, **{name: depth})
        if not len(tune):
            break
        recall = round(recall_at_k(found(tune, tune_ids), tune_truth), 5)
        tried.append([depth, recall])
        if recall >= target:
            break
    out: dict[str, Any] = {"depth": int(depth), "tried": tried}
    if len(held):
        start = time.perf_counter()
        answers = found(held, held_ids)
        batch = (time.perf_counter() - start) * 1000 / len(held)
        out["held_recall"] = round(recall_at_k(answers, held_truth), 5)
        if vectors is not None:
            plain = found(held, held_ids, with_rerank=False)
            out["held_recall_without_rerank"] = round(recall_at_k(plain, held_truth), 5)
        singles = min(50, len(held))
        start = time.perf_counter()
        for q in range(singles):
            found(held[q : q + 1], held_ids[q : q + 1])
        single = (time.perf_counter() - start) * 1000 / singles
        out["latency_ms"] = {
            "per_query_in_a_batch": round(batch, 4),
            "one_query": round(single, 4),
            "batch": len(held),
        }
    return out
