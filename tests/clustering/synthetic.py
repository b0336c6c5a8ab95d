"""Seeded synthetic embeddings written straight into the run-directory layout.

FAISS stages need no images or models: ``write_run`` produces ``embeddings/part-NNNNN.parquet``
with the embed stage's schema and a run.json whose ``stages.embed.embedder`` record is what the
index and search stages read.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from semclust import runinfo, storage
from semclust.embed.actors import EmbedderSpec
from semclust.rundir import schemas
from semclust.rundir.layout import EMBEDDINGS

EMBEDDER = EmbedderSpec(
    backbone="efficientnet_lite0",
    weights="default",
    input_size=224,
    resize="center_crop",
    batch_size=32,
    normalize=True,
    seed=0,
    keras_backend="tensorflow",
)


def planted(
    n: int, k: int, dim: int, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows float32 (n, D) around k random unit centres, their labels (n,), the centres (k, D).

    ``noise`` is the expected norm of a row's offset from its centre; random unit centres in D
    dimensions are about sqrt(2) apart, so noise well under 1 gives well-separated clusters.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, k, n)
    x = centres[labels] + noise * rng.normal(size=(n, dim)) / np.sqrt(dim)
    return x.astype(np.float32), labels, centres.astype(np.float32)


def write_run(
    run_dir: Path | str,
    x: np.ndarray,
    *,
    rows_per_part: int,
    embedder: EmbedderSpec | None = EMBEDDER,
    first_part: int = 0,
    prefix: str = "img",
) -> np.ndarray:
    """Write float32 (n, D) rows as embeddings shards (+ run.json) in a local folder or an s3://
    prefix; returns their image ids (n,)."""
    uris = [f"file:///synthetic/{prefix}-{i:07d}.jpg" for i in range(len(x))]
    ids = np.array([storage.image_id_for(u) for u in uris], dtype=np.int64)
    dim = x.shape[1]
    for part, s in enumerate(range(0, len(x), rows_per_part), start=first_part):
        rows = slice(s, s + rows_per_part)
        n = len(ids[rows])
        table = pa.table(
            {
                "image_id": pa.array(ids[rows], pa.int64()),
                "uri": pa.array(uris[rows], pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.ascontiguousarray(x[rows]).ravel(), pa.float32()), dim
                ),
                "width": pa.array(np.full(n, 640), pa.int32()),
                "height": pa.array(np.full(n, 480), pa.int32()),
                "frame_time": pa.nulls(n, pa.float32()),
                "frame_index": pa.nulls(n, pa.int32()),
            },
            schema=schemas.embeddings(dim),
        )
        name = f"part-{part:05d}.parquet"
        storage.write_parquet(storage.join(str(run_dir), EMBEDDINGS, name), table)
    if embedder is not None:
        record = {"status": "done", "embedded": len(x), "dim": dim, "embedder": asdict(embedder)}
        runinfo.update_stage(str(run_dir), "embed", record, {})
    return ids


def brute_force_knn(
    x: np.ndarray, k: int, rows: np.ndarray | None = None, *, exclude_self: bool = True
) -> np.ndarray:
    """Exact cosine top-k row indices (q, k) of ``x[rows]`` (all rows by default) in float64."""
    xn = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float64)
    rows = np.arange(len(x)) if rows is None else np.asarray(rows)
    out = np.empty((len(rows), k), dtype=np.int64)
    for s in range(0, len(rows), 1024):
        block = rows[s : s + 1024]
        sims = xn[block] @ xn.T
        if exclude_self:
            sims[np.arange(len(block)), block] = -np.inf
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        out[s : s + 1024] = np.take_along_axis(top, order, axis=1)
    return out
