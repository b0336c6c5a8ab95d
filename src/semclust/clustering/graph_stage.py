"""The graph stage: a FAISS kNN graph of every embedding, batches of query shards spread over
Ray actors (``knn``), then near-duplicate groups (``duplicates``).

An approximate graph's search depth is tuned to ``graph.target_recall`` on one seeded sample of
queries; its recall@k is then measured against exact search on a second, held-out sample and goes
into run.json; under ``graph.min_recall`` the stage fails. Resume: with the same settings only
missing ``knn/`` parts are searched (the stored index and the tuning's deterministic answer are
the same), and a finished graph is left as it is.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import numpy as np

from semclust import runinfo, storage
from semclust.clustering.duplicates import write_duplicates
from semclust.clustering.knn import (
    GRAPH_INDEX,
    GRAPH_SEED,
    GraphSearcher,
    actor_plan,
    batch_groups,
    build_graph_index,
    choose_method,
    drop_self,
    exact_neighbors,
    graph_spec,
    recall_queries,
)
from semclust.config import GraphConfig, parse_bytes
from semclust.context import RunContext
from semclust.errors import RunFailed, UserError
from semclust.index.exact import recall_at_k
from semclust.index.factory import IndexSpec, depth_name
from semclust.index.faiss_ops import remote_options, task_resources
from semclust.rundir.embeddings import ShardSet
from semclust.rundir.layout import DUPLICATES, KNN
from semclust.rundir.tables import part_uri

log = logging.getLogger(__name__)

_METHOD_NAMES = {"exact": "exact (flat)", "ivf": "ivf", "hnsw": "hnsw"}
_UNTUNED_DEPTH = 16  # nprobe / efSearch when recall_sample=0 leaves nothing to tune on


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
    }
    index_uri = storage.join(run_dir, KNN, GRAPH_INDEX) if method != "exact" else None
    if index_uri is not None and not storage.exists(index_uri):
        ctx.ensure_held()
        record["index_build"] = _build_index(ctx, shards, spec, index_uri)
    record.update(_search(ctx, shards, spec, index_uri, k, pending, gpu))
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


class _Probe:
    """Two disjoint seeded samples of rows of the run and their exact neighbours: ``tune`` sets
    an approximate graph's search depth, ``held_out`` measures the recall reported."""

    def __init__(self, ctx: RunContext, shards: ShardSet, k: int, sample: int) -> None:
        gc = ctx.cfg.graph
        # One read of the shards for both samples: 2 x sample distinct rows, split at random.
        ids, rows = recall_queries(shards, min(2 * sample, shards.total), GRAPH_SEED)
        order = np.random.default_rng(GRAPH_SEED).permutation(len(ids))
        tune, held_out = np.sort(order[: len(ids) // 2]), np.sort(order[len(ids) // 2 :])
        self.tune = ids[tune], rows[tune]
        self.held_out = ids[held_out], rows[held_out]
        with runinfo.timed("graph exact neighbours of the recall samples") as exact_time:
            truth = exact_neighbors(ctx, shards, ids, rows, k, gc.metric)
        self.tune_truth, self.held_out_truth = truth[tune], truth[held_out]
        self.exact_seconds = exact_time["seconds"]


def _search(
    ctx: RunContext,
    shards: ShardSet,
    spec: IndexSpec,
    index_uri: str | None,
    k: int,
    pending: list[str],
    gpu: bool,
) -> dict[str, Any]:
    """Write the ``pending`` shards' ``knn/`` parts in a pool of searcher actors, batch by batch;
    for an approximate graph first tune its depth, then measure recall on held-out queries.
    The record's rows, depth, tuning, timings and recall."""
    from ray.util import ActorPool

    gc = ctx.cfg.graph
    ray = ctx.start_ray()
    rows_of = dict(zip(shards.uris, shards.rows, strict=True))
    rows = shards.total - sum(rows_of[u] for u in pending)
    depth = depth_name(spec)
    fixed = {"nprobe": gc.nprobe, "ef_search": gc.ef_search}.get(depth or "")
    sample = min(gc.recall_sample, shards.total)
    # The exact neighbours are Ray tasks: they run before the actors claim the CPUs.
    probe = _Probe(ctx, shards, k, sample) if depth and sample > 0 else None
    out: dict[str, Any] = {}
    n_actors, cpus = actor_plan(gc, gpu, max(1, len(pending)))
    if not pending and probe is None:  # nothing to search or measure (an exact graph resumed)
        n_actors = 0
    with runinfo.timed("graph queries") as query_time:
        num_gpus = 1 if gpu and spec.kind != "hnsw" else 0
        actor_cls = ctx.remote(GraphSearcher, **remote_options(num_cpus=cpus, num_gpus=num_gpus))
        actors = [actor_cls.remote(shards, spec, index_uri, gc, cpus) for _ in range(n_actors)]
        try:
            if depth and actors:
                out[depth], out["tuning"] = _choose_depth(ray, actors[0], probe, fixed, k, gc)
                ray.get([a.set_depth.remote(out[depth]) for a in actors])
            bucketed = gc.bucketed and spec.kind == "ivf_flat" and not num_gpus
            out["search"] = "bucketed" if bucketed else "plain"
            if pending:
                ctx.ensure_held()
                batch_rows = max(1, parse_bytes(gc.batch_memory) // (4 * shards.dim))
                batches = batch_groups(pending, [rows_of[u] for u in pending], batch_rows, n_actors)
                rows += sum(
                    ActorPool(actors).map_unordered(
                        lambda a, b: a.graph_batch.remote(
                            b, [part_uri(ctx.run_dir, KNN, u) for u in b], k
                        ),
                        batches,
                    )
                )
                out["batches"] = len(batches)
            if probe is not None:
                ids, queries = probe.held_out
                found, sims = ray.get(actors[0].search.remote(queries, k + 1))
                found = drop_self(ids, found, sims, k)[0]
                out["recall"] = {
                    "recall_at_k": round(recall_at_k(found, probe.held_out_truth), 5),
                    "queries": len(ids),
                    "exact_seconds": probe.exact_seconds,
                }
        finally:  # free their CPUs/GPUs for what follows, also after a failure
            for actor in actors:
                ray.kill(actor)
    if rows != shards.total:
        raise RuntimeError(f"the graph covers {rows} rows but the shards hold {shards.total}")
    return {"rows": rows, "actors": n_actors, "query_seconds": query_time["seconds"], **out}


def _choose_depth(
    ray: Any, actor: Any, probe: _Probe | None, fixed: int | None, k: int, gc: GraphConfig
) -> tuple[int, dict[str, Any]]:
    """The search depth: ``fixed`` when set, else tuned on the probe's tuning sample (without
    one, recall_sample=0, a fixed fallback); with the tuning's record."""
    if fixed is not None:
        return fixed, {"chosen_by": "config"}
    if probe is None:
        log.warning(
            "graph.recall_sample=0: the search depth cannot be tuned; using %d", _UNTUNED_DEPTH
        )
        return _UNTUNED_DEPTH, {"chosen_by": "default (no recall sample)"}
    ids, queries = probe.tune
    tuned = ray.get(actor.tune.remote(ids, queries, probe.tune_truth, k, gc.target_recall))
    if tuned["recall"] < gc.target_recall:
        log.warning(
            "graph: the deepest search reaches recall@%d %.4f, under graph.target_recall=%s",
            k,
            tuned["recall"],
            gc.target_recall,
        )
    return int(tuned["value"]), {
        "chosen_by": "target_recall",
        "target_recall": gc.target_recall,
        "queries": len(ids),
        "tried": tuned["tried"],
    }


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
        f"{gc.min_recall}: raise --graph-target-recall (now {gc.target_recall}), set a larger "
        "--graph-nprobe, or use --graph-method exact",
        record,
    )
