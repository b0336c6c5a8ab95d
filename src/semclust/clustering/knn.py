"""The kNN graph's pieces: the method by N, the index a graph searches, and the actor that
answers a shard's queries (the graph stage, ``graph_stage``, runs them).

Methods (``graph.method``):

- ``exact``: each actor builds a flat index from the embeddings shards (on its GPUs when there are
  any, float16 storage with ``graph.fp16``) and answers exactly;
- ``ivf`` / ``hnsw``: one Ray task trains an IVF-Flat (or builds an HNSW, CPU only) on a sample,
  adds the shards one by one and stores the index under ``knn/.graph-index/``; each actor loads
  that file (never an object pickled from the driver), IVF onto its GPUs when present;
- ``auto``: exact up to ``exact_max_rows`` rows, IVF above.

Each query shard becomes ``knn/part-NNNNN.parquet`` (``rundir.tables.knn_table``): ``image_id``,
``neighbors`` list<int64>[k] and ``similarities`` list<float32>[k], nearest first, the row itself
excluded. Similarity is the cosine for ``metric=cosine`` and minus the squared L2 distance for
``metric=l2``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from semclust import storage
from semclust.config import GraphConfig, parse_bytes
from semclust.index.exact import exact_topk, recall_at_k, similarity_space
from semclust.index.factory import IndexSpec, auto_nlist, build_index, train_rows_for
from semclust.index.faiss_ops import (
    claimed_cpus,
    load_index,
    resolve_gpus,
    set_search_params,
    set_threads,
    store_index,
    to_gpus,
)
from semclust.rundir.embeddings import ShardSet, read_checked, sample_rows
from semclust.rundir.tables import knn_table

if TYPE_CHECKING:
    from semclust.context import RunContext

log = logging.getLogger(__name__)

GRAPH_INDEX = ".graph-index/index.faiss"  # hidden: shard listings skip it; removed when done
_EXACT_MAX_ROWS_GPU = 4_000_000
# On CPU, IVF (nprobe 16) overtook exact search near 30,000 rows at 256-d (benchmarks/faiss_scale).
_EXACT_MAX_ROWS_CPU = 50_000
GRAPH_SEED = 1234  # IVF training sample and recall queries


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
    ) -> None:
        import faiss

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
        storage.write_parquet(out_uri, knn_table(ids, neighbors, sims))
        return len(ids)


def build_graph_index(
    shards: ShardSet, spec: IndexSpec, gc: GraphConfig, out_uri: str, seed: int
) -> dict[str, Any]:
    """Ray task body: train and fill the approximate index, store it at ``out_uri``."""
    set_threads(claimed_cpus())
    gpus = resolve_gpus(gc.device, "graph index build") if spec.kind != "hnsw" else 0
    rows = train_rows_for(spec, shards.total, 64, parse_bytes(gc.max_train_memory))
    index, stats = build_index(spec, shards, train_rows=rows, seed=seed, gpus=gpus)
    stats["file_bytes"] = store_index(index, out_uri)
    return stats


def actor_plan(gc: GraphConfig, gpu: bool, jobs: int) -> tuple[int, float]:
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
    ctx: RunContext,
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
    truth, truth_sims = exact_topk(ctx, shards.uris, queries, k + 1, metric)
    truth, _ = drop_self(query_ids, truth, truth_sims, k)
    return recall_at_k(found, truth)
