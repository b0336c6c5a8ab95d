"""The index stage: a FAISS index over every embedding, with ``ids.parquet`` and ``meta.json``.

``index/index.faiss`` holds the vectors under their image ids (so a search returns image ids
directly); ``index/ids.parquet`` maps ``image_id`` to ``uri``; ``index/meta.json`` records the
metric, dimension and the embedder settings, so ``semclust search`` can embed a query exactly as
the run did without reading the embeddings again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from semclust import runinfo, storage
from semclust.clustering.shards import check_finite, embedding_shards, normalize_rows
from semclust.config import RunConfig

log = logging.getLogger(__name__)

INDEX_DIR = "index"


def run_index(cfg: RunConfig) -> dict[str, Any]:
    """Add the embeddings shard by shard to a flat index and store it in the run directory."""
    import faiss

    from semclust.embed.pipeline import prepare_run_dir

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
    base = faiss.IndexFlatIP(shards.dim) if ic.metric == "cosine" else faiss.IndexFlatL2(shards.dim)
    index = faiss.IndexIDMap2(base)
    id_tables = []
    for uri in shards.uris:
        table = storage.read_parquet(uri, columns=["image_id", "uri", "embedding"])
        ids = table.column("image_id").to_numpy()
        flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        x = np.asarray(flat, dtype=np.float32).reshape(len(ids), shards.dim)
        check_finite(x, uri)
        if ic.metric == "cosine":
            x = normalize_rows(x)
        index.add_with_ids(np.ascontiguousarray(x), ids.astype(np.int64))
        id_tables.append(table.select(["image_id", "uri"]))
    index_dir = storage.join(run_dir, INDEX_DIR)
    storage.write_parquet(storage.join(index_dir, "ids.parquet"), pa.concat_tables(id_tables))
    storage.write_bytes(
        storage.join(index_dir, "index.faiss"), faiss.serialize_index(index).tobytes()
    )
    meta = {
        "type": ic.type,
        "metric": ic.metric,
        "dim": shards.dim,
        "count": int(index.ntotal),
        "embedder": embedder,
    }
    # meta.json last: its presence marks a complete index.
    storage.write_json(storage.join(index_dir, "meta.json"), meta)
    record = {**meta, "seconds": round(time.perf_counter() - start, 3)}
    record.pop("embedder")
    runinfo.update_stage(run_dir, "index", record, cfg.to_dict())
    return record
