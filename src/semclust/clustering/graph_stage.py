"""The graph stage: a FAISS kNN graph of every embedding, queries sharded over Ray actors
(``knn``), then near-duplicate groups (``duplicates``).

An approximate graph's recall@k is measured against exact search on a seeded sample of queries
and goes into run.json; under ``graph.min_recall`` the stage fails. Resume: with the same
settings only missing ``knn/`` parts are searched, and a finished graph is left as it is.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from semclust import runinfo, storage
from semclust.clustering.duplicates import write_duplicates
from semclust.clustering.knn import (
    GRAPH_INDEX,
    GRAPH_SEED,
    GraphSearcher,
    actor_plan,
    build_graph_index,
    choose_method,
    exact_recall,
    graph_spec,
    recall_queries,
)
from semclust.context import RunContext
from semclust.errors import RunFailed, UserError
from semclust.index.factory import IndexSpec
from semclust.index.faiss_ops import remote_options, task_resources
from semclust.rundir.embeddings import ShardSet
from semclust.rundir.layout import DUPLICATES, KNN
from semclust.rundir.tables import part_uri

log = logging.getLogger(__name__)

_METHOD_NAMES = {"exact": "exact (flat)", "ivf": "ivf", "hnsw": "hnsw"}


def settings(ctx: RunContext) -> dict[str, Any]:
    """The graph section, the embeddings' fingerprint and the k used (at most N - 1)."""
    shards = ctx.embeddings()
    if shards.total < 2:
        raise UserError("a kNN graph needs at least 2 embedded images")
    k = min(ctx.cfg.graph.k, shards.total - 1)
    return {"graph": asdict(ctx.cfg.graph), "embeddings": shards.fingerprint(), "k": k}


def run(ctx: RunContext) -> dict[str, Any]:
    """Search every shard without a ``knn/`` part, check recall, find duplicates; the record."""
    from semclust.ray_runtime import use_gpu

    gc = ctx.cfg.graph
    run_dir = ctx.run_dir
    shards = ctx.embeddings()
    k = int(ctx.settings["k"])
    if k < gc.k:
        log.warning("graph.k=%d but only %d images: using k=%d", gc.k, shards.total, k)
    if not ctx.resumable:
        storage.remove_tree(storage.join(run_dir, KNN))
        storage.remove_tree(storage.join(run_dir, DUPLICATES))
    done = set(storage.list_shards(storage.join(run_dir, KNN)))
    pending = [u for u in shards.uris if part_uri(run_dir, KNN, u) not in done]
    duplicates_present = gc.duplicate_threshold is None or bool(
        storage.list_shards(storage.join(run_dir, DUPLICATES))
    )
    if (
        ctx.resumable
        and not pending
        and duplicates_present
        and ctx.previous.get("status") == "done"
    ):
        log.info("graph: already done with the same settings on the same embeddings")
        return ctx.previous
    ctx.start_ray()
    gpu = use_gpu(gc.device)
    method = choose_method(gc, shards.total, gpu)
    spec = graph_spec(gc, method, shards.total, shards.dim)
    record: dict[str, Any] = {
        "k": k,
        "metric": gc.metric,
        "method": _METHOD_NAMES[method],
        "index": spec.factory,
        "device": "gpu" if gpu and method != "hnsw" else "cpu",
        **({"nprobe": gc.nprobe} if method == "ivf" else {}),
        **({"ef_search": gc.ef_search} if method == "hnsw" else {}),
    }
    index_uri = storage.join(run_dir, KNN, GRAPH_INDEX) if method != "exact" else None
    check_recall = method != "exact" and gc.recall_sample > 0
    if index_uri is not None and (pending or check_recall) and not storage.exists(index_uri):
        ctx.ensure_held()
        record["index_build"] = _build_index(ctx, shards, spec, index_uri)
    record.update(_search(ctx, shards, spec, index_uri, k, pending, check_recall, gpu))
    if gc.duplicate_threshold is not None:
        ctx.ensure_held()
        record["duplicates"] = write_duplicates(run_dir, shards, gc.duplicate_threshold)
    _check_recall_floor(ctx, record, method)
    if index_uri is not None:
        storage.remove_tree(storage.join(run_dir, KNN, GRAPH_INDEX.split("/")[0]))
    return record


def summary(record: dict[str, Any]) -> str:
    line = f"k={record['k']} {record['method']}, {record['rows']} rows"
    if record.get("recall"):
        line += f", recall@k {record['recall']['recall_at_k']}"
    if record.get("duplicates"):
        line += f", {record['duplicates']['groups']} duplicate groups"
    return line


def _build_index(
    ctx: RunContext, shards: ShardSet, spec: IndexSpec, index_uri: str
) -> dict[str, Any]:
    """Train and fill the approximate index in one Ray task; its build statistics."""
    gc = ctx.cfg.graph
    with runinfo.timed("graph index build") as build_time:
        task = ctx.remote(build_graph_index, **task_resources(gc.device, None))
        stats = ctx.start_ray().get(task.remote(shards, spec, gc, index_uri, GRAPH_SEED))
    return {**stats, "seconds": build_time["seconds"]}


def _search(
    ctx: RunContext,
    shards: ShardSet,
    spec: IndexSpec,
    index_uri: str | None,
    k: int,
    pending: list[str],
    check_recall: bool,
    gpu: bool,
) -> dict[str, Any]:
    """Write the ``pending`` shards' ``knn/`` parts in a pool of searcher actors and, with
    ``check_recall``, measure recall@k on seeded queries; the record's rows, timings, recall."""
    from ray.util import ActorPool

    gc = ctx.cfg.graph
    ray = ctx.start_ray()
    rows_of = dict(zip(shards.uris, shards.rows, strict=True))
    rows = shards.total - sum(rows_of[u] for u in pending)
    probe = None
    with runinfo.timed("graph queries") as query_time:
        actors = []
        if pending or check_recall:
            n_actors, cpus = actor_plan(gc, gpu, max(1, len(pending)))
            num_gpus = 1 if gpu and spec.kind != "hnsw" else 0
            actor_cls = ctx.remote(
                GraphSearcher, **remote_options(num_cpus=cpus, num_gpus=num_gpus)
            )
            actors = [actor_cls.remote(shards, spec, index_uri, gc, cpus) for _ in range(n_actors)]
        try:
            if pending:
                ctx.ensure_held()
                rows += sum(
                    ActorPool(actors).map_unordered(
                        lambda a, u: a.graph_shard.remote(
                            u, part_uri(ctx.run_dir, KNN, u), k, gc.query_batch_size
                        ),
                        pending,
                    )
                )
            if check_recall:
                query_ids, queries = recall_queries(shards, gc.recall_sample, GRAPH_SEED)
                found, found_sims = ray.get(actors[0].search.remote(queries, k + 1))
                probe = (query_ids, queries, found, found_sims)
        finally:  # free their CPUs/GPUs for what follows, also after a failure
            for actor in actors:
                ray.kill(actor)
    if rows != shards.total:
        raise RuntimeError(f"the graph covers {rows} rows but the shards hold {shards.total}")
    out: dict[str, Any] = {"rows": rows, "query_seconds": query_time["seconds"]}
    if probe is not None:
        with runinfo.timed("graph recall check") as recall_time:
            recall = exact_recall(ctx, shards, *probe, k, gc.metric)
        out["recall"] = {
            "recall_at_k": round(recall, 5),
            "queries": len(probe[0]),
            "seconds": recall_time["seconds"],
        }
    return out


class RecallUnderFloor(RunFailed):
    """The graph's measured recall is under ``graph.min_recall``; ``record``: the stage's record
    with that measurement, kept in run.json with the failure."""

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


def _check_recall_floor(ctx: RunContext, record: dict[str, Any], method: str) -> None:
    """Fail the stage when the measured recall is under ``graph.min_recall``."""
    gc = ctx.cfg.graph
    recall = record.get("recall", {}).get("recall_at_k")
    if recall is None or gc.min_recall is None or recall >= gc.min_recall:
        return
    k = record["k"]
    raise RecallUnderFloor(
        f"the {method} graph's recall@{k} is {recall:.4f}, under graph.min_recall="
        f"{gc.min_recall}: raise --graph-nprobe (now {gc.nprobe}) or use --graph-method exact",
        record,
    )
