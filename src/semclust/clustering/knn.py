"""The graph stage: an exact FAISS kNN graph, queries processed shard by shard in Ray actors.

Each actor loads every embeddings shard from the run directory into its own flat index (never
pickled from the driver) and answers the query shards it is given, writing
``knn/part-NNNNN.parquet`` with ``image_id``, ``neighbors`` list<int64>[k] and ``similarities``
list<float32>[k], nearest first, the row itself excluded. Similarity is cosine for
``metric=cosine`` and minus the squared L2 distance for ``metric=l2``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa

from semclust import runinfo, storage
from semclust.clustering.shards import check_finite, embedding_shards, normalize_rows
from semclust.config import RunConfig
from semclust.embed.pipeline import read_embeddings

log = logging.getLogger(__name__)

KNN_DIR = "knn"


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

    Where the row's own id is not among the results (exact duplicates can outrank it), the last
    column is dropped instead.
    """
    is_self = labels == query_ids[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    # Exactly one True per row: remove it and keep the order of the rest.
    keep = ~is_self
    return labels[keep].reshape(-1, k), scores[keep].reshape(-1, k)


class FlatKnnSearcher:
    """An exact index over every embeddings shard of a run; ids are the image ids."""

    def __init__(self, shard_uris: list[str], metric: str, threads: int | None = None) -> None:
        import faiss

        faiss.omp_set_num_threads(threads or os.cpu_count() or 1)
        self.metric = metric
        ids, vectors = zip(*(read_embeddings(u) for u in shard_uris), strict=True)
        self.ids = np.concatenate(ids)
        x = np.concatenate(vectors)
        check_finite(x, "the embeddings")
        if metric == "cosine":
            x = normalize_rows(x)
            self.index = faiss.IndexFlatIP(x.shape[1])
        else:
            self.index = faiss.IndexFlatL2(x.shape[1])
        self.index.add(np.ascontiguousarray(x, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(image ids int64 (n, k), similarities float32 (n, k)) of each query row."""
        x = normalize_rows(queries) if self.metric == "cosine" else queries
        scores, rows = self.index.search(np.ascontiguousarray(x, dtype=np.float32), k)
        if self.metric == "l2":
            scores = -scores
        return self.ids[rows], scores.astype(np.float32)

    def graph_shard(self, shard_uri: str, out_uri: str, k: int, batch: int) -> int:
        ids, vectors = read_embeddings(shard_uri)
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


def run_graph(cfg: RunConfig) -> dict[str, Any]:
    """Build the kNN graph of every embedded image; returns the run.json record."""
    import ray

    from semclust.embed.pipeline import prepare_run_dir
    from semclust.ray_runtime import ensure_ray

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
    storage.remove_tree(storage.join(run_dir, KNN_DIR))
    ensure_ray(cfg.ray)
    actor_cls = ray.remote(num_cpus=1)(FlatKnnSearcher)
    actors = [actor_cls.remote(shards.uris, gc.metric) for _ in range(gc.num_actors)]
    futures = [
        actors[i % len(actors)].graph_shard.remote(
            uri, storage.join(run_dir, KNN_DIR, uri.rsplit("/", 1)[-1]), k, gc.query_batch_size
        )
        for i, uri in enumerate(shards.uris)
    ]
    rows = int(sum(ray.get(futures)))
    for actor in actors:
        ray.kill(actor)
    if rows != shards.total:
        raise RuntimeError(f"the graph covers {rows} rows but the shards hold {shards.total}")
    record = {
        "k": k,
        "metric": gc.metric,
        "method": "exact (flat)",
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 3),
    }
    runinfo.update_stage(run_dir, "graph", record, cfg.to_dict())
    return record
