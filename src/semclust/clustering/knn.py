"""The graph stage: a FAISS kNN graph of every embedding, queries sharded over Ray actors.

Methods (``graph.method``):

- ``exact``: each actor builds a flat index from the embeddings shards (on its GPUs when there are
  any, float16 storage with ``graph.fp16``) and answers exactly;
- ``ivf`` / ``hnsw``: one Ray task trains an IVF-Flat (or builds an HNSW, CPU only) on a sample,
  adds the shards one by one and stores the index under ``knn/.graph-index/``; each actor loads
  that file (never an object pickled from the driver), IVF onto its GPUs when present;
- ``auto``: exact up to ``exact_max_rows`` rows, IVF above.

Each query shard becomes ``knn/part-NNNNN.parquet`` (same part number as the embeddings shard):
``image_id``, ``neighbors`` list<int64>[k] and ``similarities`` list<float32>[k], nearest first,
the row itself excluded. Similarity is the cosine for ``metric=cosine`` and minus the squared L2
distance for ``metric=l2``. An approximate graph's recall@k is measured against exact search on a
sample of queries; near-duplicate groups are the connected components of edges above
``duplicate_threshold`` (``duplicates/``). Both go into run.json.
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
    load_index,
    record_failure,
    resolve_gpus,
    set_search_params,
    set_threads,
    store_index,
    to_gpus,
    unwrap_remote_errors,
)
from semclust.clustering.shards import (
    ShardSet,
    embedding_shards,
    read_checked,
    same_settings,
    sample_rows,
)
from semclust.config import GraphConfig, RunConfig, parse_bytes
from semclust.index.factory import IndexSpec, auto_nlist, build_index, train_rows_for

log = logging.getLogger(__name__)

KNN_DIR = "knn"
GRAPH_INDEX = ".graph-index/index.faiss"  # hidden: shard listings skip it; removed when done
_EXACT_MAX_ROWS_GPU = 4_000_000
# On CPU, IVF (nprobe 16) overtook exact search near 30,000 rows at 256-d (benchmarks/faiss_scale).
_EXACT_MAX_ROWS_CPU = 50_000
_SEED = 1234  # IVF training sample and recall queries


def knn_schema(k: int) -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.int64()),
            ("neighbors", pa.list_(pa.int64(), k)),
            ("similarities", pa.list_(pa.float32(), k)),
        ]
    )


def drop_self(
    query_ids: np.ndarray, labels: np.ndarray, scores: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """From (n, k+1) search results keep k per row, removing the query's own id.

    Where the row's own id is not among the results (exact duplicates can outrank it, and an
    approximate search can miss it), the last column is dropped instead.
    """
    is_self = labels == query_ids[:, None]
    # Only the first match counts: a second hit of the same id would leave k-1 columns.
    first = np.argmax(is_self, axis=1)
    is_self = np.zeros_like(is_self)
    found = (labels == query_ids[:, None]).any(axis=1)
    is_self[np.arange(len(labels)), np.where(found, first, labels.shape[1] - 1)] = True
    keep = ~is_self
    return labels[keep].reshape(-1, k), scores[keep].reshape(-1, k)


def choose_method(gc: GraphConfig, n: int, gpu: bool) -> str:
    """``exact``, ``ivf`` or ``hnsw`` for N rows (``auto``: exact up to exact_max_rows)."""
    if gc.method != "auto":
        return gc.method
    limit = gc.exact_max_rows or (_EXACT_MAX_ROWS_GPU if gpu else _EXACT_MAX_ROWS_CPU)
    return "exact" if n <= limit else "ivf"


def graph_spec(gc: GraphConfig, method: str, n: int, dim: int) -> IndexSpec:
    if method == "exact":
        return IndexSpec("flat", dim, gc.metric)
    if method == "hnsw":
        return IndexSpec(
            "hnsw", dim, gc.metric, hnsw_m=gc.hnsw_m, ef_construction=gc.ef_construction
        )
    return IndexSpec("ivf_flat", dim, gc.metric, nlist=min(gc.nlist or auto_nlist(n), n))


class GraphSearcher:
    """One actor's index over every embedding of the run; rows map to image ids."""

    def __init__(
        self,
        shards: ShardSet,
        spec: IndexSpec,
        index_uri: str | None,
        gc: GraphConfig,
        threads: float | None,
        s3: Any = None,
    ) -> None:
        import faiss

        adopt_storage(s3)
        set_threads(threads)
        self.spec = spec
        gpus = resolve_gpus(gc.device, "graph search")
        id_parts = []
        if index_uri is None:
            flat = faiss.IndexFlatIP if spec.inner_product else faiss.IndexFlatL2
            index: Any = flat(spec.dim)
            # One GPU: add straight into GPU memory. Several: FAISS's sharded index takes one
            # add() only, so the rows are gathered on the host first and then split over the GPUs.
            if gpus == 1:
                index = to_gpus(index, fp16=gc.fp16)
            for uri in shards.uris:
                ids, vectors = read_checked(uri, spec.dim)
                index.add(similarity_space(vectors, spec.metric))
                id_parts.append(ids)
            if gpus > 1:
                index = to_gpus(index, fp16=gc.fp16, shard=True)
        else:
            index = load_index(index_uri)
            if gpus and spec.kind != "hnsw":
                index = to_gpus(index)
            set_search_params(index, nprobe=gc.nprobe, ef_search=gc.ef_search, on_gpu=gpus > 0)
            for uri in shards.uris:
                table = storage.read_parquet(uri, ["image_id"])
                id_parts.append(table.column("image_id").to_numpy())
        if gc.fp16 and not gpus:
            log.warning("graph.fp16 applies to GPU indexes only; this actor searches in float32")
        self.index = index
        self.ids = np.concatenate(id_parts)
        self.gpus = gpus
        if index.ntotal != len(self.ids):
            raise RuntimeError(
                f"the graph index holds {index.ntotal} rows, the shards {len(self.ids)}"
            )

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(image ids int64 (n, k), similarities float32 (n, k)) of float32 (n, D) queries."""
        scores, rows = self.index.search(similarity_space(queries, self.spec.metric), k)
        ids = np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)
        sims = np.where(rows >= 0, self.spec.to_similarity(scores), -np.inf).astype(np.float32)
        return ids, sims

    def graph_shard(self, shard_uri: str, out_uri: str, k: int, batch: int) -> int:
        """Search every row of one shard (k+1, self removed) and write its knn shard."""
        ids, vectors = read_checked(shard_uri, self.spec.dim)
        neighbors = np.empty((len(ids), k), dtype=np.int64)
        sims = np.empty((len(ids), k), dtype=np.float32)
        for s in range(0, len(ids), batch):
            labels, scores = self.search(vectors[s : s + batch], k + 1)
            neighbors[s : s + batch], sims[s : s + batch] = drop_self(
                ids[s : s + batch], labels, scores, k
            )
        table = pa.table(
            {
                "image_id": pa.array(ids, pa.int64()),
                "neighbors": pa.FixedSizeListArray.from_arrays(pa.array(neighbors.ravel()), k),
                "similarities": pa.FixedSizeListArray.from_arrays(pa.array(sims.ravel()), k),
            },
            schema=knn_schema(k),
        )
        storage.write_parquet(out_uri, table)
        return len(ids)


def build_graph_index(
    shards: ShardSet, spec: IndexSpec, gc: GraphConfig, out_uri: str, seed: int, s3: Any = None
) -> dict[str, Any]:
    """Ray task body: train and fill the approximate index, store it at ``out_uri``."""
    adopt_storage(s3)
    set_threads(claimed_cpus())
    gpus = resolve_gpus(gc.device, "graph index build") if spec.kind != "hnsw" else 0
    rows = train_rows_for(spec, shards.total, 64, parse_bytes(gc.max_train_memory))
    index, stats = build_index(spec, shards, train_rows=rows, seed=seed, gpus=gpus)
    stats["file_bytes"] = store_index(index, out_uri)
    return stats


def _actor_plan(gc: GraphConfig, gpu: bool, jobs: int) -> tuple[int, float]:
    """(actors, CPUs per actor): one per GPU, else gc.num_actors sharing the cluster's CPUs."""
    import ray

    res = ray.cluster_resources()
    wanted = gc.num_actors or (int(res.get("GPU", 1)) if gpu else 1)
    actors = max(1, min(wanted, jobs))
    cpus = gc.actor_num_cpus or max(1.0, float(int(res.get("CPU", 1) // actors)))
    return actors, cpus


def recall_queries(shards: ShardSet, sample: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded query rows for the recall check: (image ids int64 (q,), float32 (q, D))."""
    return sample_rows(shards, sample, seed + 1, with_ids=True)


def exact_recall(
    shards: ShardSet,
    query_ids: np.ndarray,
    queries: np.ndarray,
    found: np.ndarray,
    found_sims: np.ndarray,
    k: int,
    metric: str,
) -> float:
    """recall@k of an index's (q, k+1) answers against exact search over every shard.

    Runs Ray tasks (1 CPU each): call it after the searching actors have been freed, or on a
    small node they would hold every CPU and the tasks would never start.
    """
    found, _ = drop_self(query_ids, found, found_sims, k)
    truth, truth_sims = exact_topk(shards.uris, queries, k + 1, metric)
    truth, _ = drop_self(query_ids, truth, truth_sims, k)
    return recall_at_k(found, truth)


def run_graph(cfg: RunConfig) -> dict[str, Any]:
    """Build the kNN graph (and near-duplicate groups) of every embedded image; run.json record."""
    from semclust.clustering.duplicates import DUPLICATES_DIR
    from semclust.embed.pipeline import prepare_run_dir
    from semclust.ray_runtime import ensure_ray, use_gpu

    gc = cfg.graph
    run_dir = cfg.run_dir
    if not run_dir:
        raise ValueError("no run directory given: pass --run-dir")
    start = time.perf_counter()
    shards = embedding_shards(run_dir)
    if shards.total < 2:
        raise ValueError("a kNN graph needs at least 2 embedded images")
    k = min(gc.k, shards.total - 1)
    if k < gc.k:
        log.warning("graph.k=%d but only %d images: using k=%d", gc.k, shards.total, k)
    prepare_run_dir(run_dir, cfg.mode, "graph")
    ensure_ray(cfg.ray)
    gpu = use_gpu(gc.device)
    method = choose_method(gc, shards.total, gpu)
    spec = graph_spec(gc, method, shards.total, shards.dim)
    knn_dir = storage.join(run_dir, KNN_DIR)
    settings = {"graph": asdict(gc), "embeddings": shards.fingerprint(), "k": k}
    reuse = same_settings(run_dir, "graph", settings, cfg.mode)
    if not reuse:
        storage.remove_tree(knn_dir)
        storage.remove_tree(storage.join(run_dir, DUPLICATES_DIR))

    def out_uri(uri: str) -> str:
        return storage.join(knn_dir, uri.rsplit("/", 1)[-1])

    done = set(storage.list_shards(knn_dir)) if reuse else set()
    pending = [u for u in shards.uris if out_uri(u) not in done]
    previous = runinfo.load(run_dir).get("stages", {}).get("graph", {})
    duplicates_present = gc.duplicate_threshold is None or bool(
        storage.list_shards(storage.join(run_dir, DUPLICATES_DIR))
    )
    if reuse and not pending and duplicates_present and previous.get("status") == "done":
        log.info("graph: already done with the same settings on the same embeddings")
        return previous
    runinfo.update_stage(
        run_dir, "graph", {"status": "running", "settings": settings}, cfg.to_dict()
    )
    with record_failure(run_dir, "graph", settings, cfg.to_dict()):
        record = _build_graph(cfg, shards, spec, method, k, pending, settings)
    record.update(status="done", settings=settings, seconds=round(time.perf_counter() - start, 3))
    runinfo.update_stage(run_dir, "graph", record, cfg.to_dict())
    return record


@unwrap_remote_errors
def _build_graph(
    cfg: RunConfig,
    shards: ShardSet,
    spec: IndexSpec,
    method: str,
    k: int,
    pending: list[str],
    settings: dict[str, Any],
) -> dict[str, Any]:
    import ray
    from ray.util import ActorPool

    from semclust.clustering.duplicates import run_duplicates
    from semclust.clustering.faiss_ops import remote_options, task_resources
    from semclust.ray_runtime import use_gpu

    gc = cfg.graph
    run_dir = cfg.run_dir
    assert run_dir is not None
    gpu = use_gpu(gc.device)
    knn_dir = storage.join(run_dir, KNN_DIR)

    def out_uri(uri: str) -> str:
        return storage.join(knn_dir, uri.rsplit("/", 1)[-1])

    record: dict[str, Any] = {
        "k": k,
        "metric": gc.metric,
        "method": {"exact": "exact (flat)", "ivf": "ivf", "hnsw": "hnsw"}[method],
        "index": spec.factory,
        "device": "gpu" if gpu and method != "hnsw" else "cpu",
    }
    if method == "ivf":
        record["nprobe"] = gc.nprobe
    if method == "hnsw":
        record["ef_search"] = gc.ef_search
    index_uri = storage.join(knn_dir, GRAPH_INDEX) if method != "exact" else None
    check_recall = method != "exact" and gc.recall_sample > 0
    if index_uri is not None and (pending or check_recall) and not storage.exists(index_uri):
        with runinfo.timed("graph index build") as build_time:
            task = ray.remote(build_graph_index).options(**task_resources(gc.device, None))
            stats = ray.get(task.remote(shards, spec, gc, index_uri, _SEED, storage.s3_options()))
        record["index_build"] = {**stats, "seconds": build_time["seconds"]}
    rows_of = dict(zip(shards.uris, shards.rows, strict=True))
    rows = sum(rows_of.values()) - sum(rows_of[u] for u in pending)
    with runinfo.timed("graph queries") as query_time:
        actors = []
        if pending or check_recall:
            n_actors, cpus = _actor_plan(gc, gpu, max(1, len(pending)))
            actor_cls = ray.remote(GraphSearcher).options(
                **remote_options(num_cpus=cpus, num_gpus=1 if gpu and method != "hnsw" else 0)
            )
            s3 = storage.s3_options()
            actors = [
                actor_cls.remote(shards, spec, index_uri, gc, cpus, s3) for _ in range(n_actors)
            ]
        try:
            rows += (
                sum(
                    ActorPool(actors).map_unordered(
                        lambda a, u: a.graph_shard.remote(u, out_uri(u), k, gc.query_batch_size),
                        pending,
                    )
                )
                if pending
                else 0
            )
            if check_recall:
                query_ids, queries = recall_queries(shards, gc.recall_sample, _SEED)
                found, found_sims = ray.get(actors[0].search.remote(queries, k + 1))
        finally:  # free their CPUs/GPUs for what follows, also after a failure
            for actor in actors:
                ray.kill(actor)
    if check_recall:
        with runinfo.timed("graph recall check") as recall_time:
            recall = exact_recall(shards, query_ids, queries, found, found_sims, k, gc.metric)
        record["recall"] = {
            "recall_at_k": round(recall, 5),
            "queries": len(query_ids),
            "seconds": recall_time["seconds"],
        }
    if rows != shards.total:
        raise RuntimeError(f"the graph covers {rows} rows but the shards hold {shards.total}")
    record.update(rows=rows, query_seconds=query_time["seconds"])
    if gc.duplicate_threshold is not None:
        record["duplicates"] = run_duplicates(run_dir, shards, gc.duplicate_threshold)
    recall = record.get("recall", {}).get("recall_at_k")
    if recall is not None and gc.min_recall is not None and recall < gc.min_recall:
        record.update(status="failed", settings=settings)
        record["error"] = f"recall@{k} {recall:.4f} is under graph.min_recall={gc.min_recall}"
        runinfo.update_stage(run_dir, "graph", record, cfg.to_dict())
        raise RuntimeError(
            f"the {method} graph's recall@{k} is {recall:.4f}, under graph.min_recall="
            f"{gc.min_recall}: raise --graph-nprobe (now {gc.nprobe}) or use --graph-method exact"
        )
    if index_uri is not None:
        storage.remove_tree(storage.join(knn_dir, GRAPH_INDEX.split("/")[0]))
    return record
