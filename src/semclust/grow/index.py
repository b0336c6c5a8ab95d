"""The search index of a grown run: the added rows appended, nothing retrained.

Index row r stays the r-th embedding in shard order: the added shards are numbered after every
earlier one, so their rows go to the end. IVF lists, PQ codebooks and HNSW links are kept as
trained; each added row goes to its nearest list (IVF) or into the graph (HNSW), as FAISS's
``add`` does. The files are rewritten one by one and ``meta.json`` last; an index that already
holds more rows than meta.json says (a crash after its write) is not added to twice.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from semclust import storage
from semclust.index.exact import similarity_space
from semclust.index.factory import IndexSpec
from semclust.index.faiss_ops import claimed_cpus, load_index, set_threads, store_index
from semclust.index.rerank import load_vectors, vectors_writer
from semclust.rundir import schemas
from semclust.rundir.embeddings import ShardSet, read_checked
from semclust.rundir.frames import read_with_frame_times
from semclust.rundir.tables import INDEX_FILE, INDEX_IDS, INDEX_META, INDEX_RERANK, index_file

log = logging.getLogger(__name__)


def has_index(run_dir: str) -> bool:
    return storage.exists(index_file(run_dir, INDEX_META))


def grow_index(run_dir: str, shards: ShardSet) -> dict[str, Any]:
    """Ray task body: append every row of ``shards`` past the index's count; the new meta.json
    (also written)."""
    set_threads(claimed_cpus())
    meta = storage.read_json(index_file(run_dir, INDEX_META))
    spec = IndexSpec(**{k: v for k, v in meta["spec"].items() if k != "factory"})
    index = load_index(index_file(run_dir, INDEX_FILE))
    before = int(meta["count"])
    if before == shards.total:
        return meta
    start = time.perf_counter()
    offsets = np.cumsum([0, *shards.rows])
    pending = [i for i, end in enumerate(offsets[1:]) if end > before]
    if index.ntotal not in (before, shards.total):
        raise RuntimeError(
            f"index/ holds {index.ntotal} vectors, meta.json {before} and the run {shards.total}: "
            "rebuild it with `semclust index --mode overwrite`"
        )
    added_rows = []
    for i in pending:
        _, vectors = read_checked(shards.uris[i], shards.dim)
        skip = max(0, before - int(offsets[i]))  # a shard only partly in the index: never so far
        x = similarity_space(vectors[skip:], spec.metric)
        if index.ntotal < shards.total:
            index.add(x)
        added_rows.append(x)
    if index.ntotal != shards.total:
        raise RuntimeError(f"the index holds {index.ntotal} vectors, the run {shards.total}")
    file_bytes = store_index(index, index_file(run_dir, INDEX_FILE))
    ids_uri = index_file(run_dir, INDEX_IDS)
    kept = storage.read_parquet(ids_uri).cast(schemas.INDEX_IDS).slice(0, before)
    new_ids = [
        read_with_frame_times(shards.uris[i], ["image_id", "uri"]).cast(schemas.INDEX_IDS)
        for i in pending
    ]
    new_ids[0] = new_ids[0].slice(max(0, before - int(offsets[pending[0]])))
    storage.write_parquet(ids_uri, pa.concat_tables([kept, *new_ids]))
    rerank_bytes = 0
    if meta.get("rerank"):
        rerank_bytes = _grow_rerank(run_dir, before, shards.total, spec.dim, added_rows)
    grown = {
        "rows_added": shards.total - before,
        "count_before": before,
        "seconds": round(time.perf_counter() - start, 3),
    }
    meta.update(
        count=shards.total,
        memory_estimate_bytes=spec.memory_bytes(shards.total),
        disk_bytes=file_bytes + rerank_bytes,
        recall_measured_at_count=meta.get("recall_measured_at_count", before),
        grown=[*meta.get("grown", []), grown],
    )
    storage.write_json(index_file(run_dir, INDEX_META), meta)  # last: the index is complete
    return meta


def _grow_rerank(run_dir: str, before: int, total: int, dim: int, added: list[np.ndarray]) -> int:
    """The float16 re-rank vectors with the added rows after the first ``before``; bytes."""
    uri = index_file(run_dir, INDEX_RERANK)
    old = load_vectors(uri)
    with vectors_writer(uri, total, dim) as out:
        out[:before] = old[:before]
        start = before
        for x in added:
            out[start : start + len(x)] = x
            start += len(x)
    del old
    return 2 * dim * total
