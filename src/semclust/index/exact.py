"""Exact top-k of a few queries against every embeddings shard, streamed (ground truth).

Used to measure the recall of approximate graphs and indexes on a sample of queries without
holding all embeddings anywhere: each Ray task searches one shard with a flat index and returns
its top-k; the driver merges (n_queries, k) arrays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from semclust.index.faiss_ops import remote_options
from semclust.rundir.embeddings import normalize_rows, read_checked

if TYPE_CHECKING:
    from semclust.context import RunContext


def similarity_space(x: np.ndarray, metric: str) -> np.ndarray:
    """Rows as searched: L2-normalised for ``cosine``, unchanged for ``l2``; float32 (n, D)."""
    return normalize_rows(x) if metric == "cosine" else np.ascontiguousarray(x, dtype=np.float32)


def shard_topk(
    shard_uris: str | list[str], queries: np.ndarray, k: int, metric: str, threads: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of float32 (q, D) queries in one shard, or in a group of shards.

    Returns (image ids int64 (q, k), similarities float32 (q, k)), best first; similarity is the
    cosine for ``cosine`` and minus the squared L2 distance for ``l2``. Where the shards have
    fewer than k rows the missing places hold id -1 and similarity -inf.
    """
    import faiss

    faiss.omp_set_num_threads(threads)
    uris = [shard_uris] if isinstance(shard_uris, str) else shard_uris
    q = similarity_space(queries, metric)
    parts = []
    for uri in uris:
        ids, vectors = read_checked(uri, queries.shape[1])
        x = similarity_space(vectors, metric)
        flat = faiss.IndexFlatIP if metric == "cosine" else faiss.IndexFlatL2
        index = flat(x.shape[1])
        index.add(x)
        scores, rows = index.search(q, min(k, len(ids)))
        sims = scores if metric == "cosine" else -scores
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        out_sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_ids[:, : rows.shape[1]] = np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)
        out_sims[:, : rows.shape[1]] = np.where(rows >= 0, sims, -np.inf)
        parts.append((out_ids, out_sims))
    return merge_topk(parts, k) if len(parts) > 1 else parts[0]


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


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (ids (q, k_i), sims (q, k_i)) into the overall top-k, best first."""
    ids = np.concatenate([p[0] for p in parts], axis=1)
    sims = np.concatenate([p[1] for p in parts], axis=1)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(sims, order, axis=1)


def exact_topk(
    ctx: RunContext, shard_uris: list[str], queries: np.ndarray, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Exact (image ids int64 (q, k), similarities float32 (q, k)) over every shard.

    Groups of consecutive shards are Ray tasks (1 CPU each, four per CPU of the cluster, so many
    small shards do not each pay a task's overhead), and the scan spreads over the cluster: call
    it when no actor holds the CPUs, or the tasks never start.
    """
    ray = ctx.start_ray()
    task = ctx.remote(shard_topk, **remote_options(num_cpus=1))
    ref = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
    tasks = max(1, min(len(shard_uris), 4 * int(ray.cluster_resources().get("CPU", 1))))
    size = -(-len(shard_uris) // tasks)
    groups = [shard_uris[s : s + size] for s in range(0, len(shard_uris), size)]
    parts: list[Any] = ray.get([task.remote(g, ref, k, metric, 1) for g in groups])
    return merge_topk(parts, k)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of |found ∩ truth| / k for int64 (q, k) id arrays (ids -1 never count)."""
    k = truth.shape[1]
    hits = 0
    for f, t in zip(found, truth, strict=True):
        hits += len(np.intersect1d(f[f >= 0], t[t >= 0]))
    return hits / (k * len(truth)) if len(truth) else 1.0
