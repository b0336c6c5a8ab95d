"""Reading embeddings shards for the FAISS stages: checked dims, row counts, seeded samples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from semclust import storage
from semclust.embed.pipeline import EMBEDDINGS_DIR, read_embeddings


@dataclass(frozen=True)
class ShardSet:
    """The committed embeddings shards of a run: URIs, rows per shard and the common dim."""

    uris: list[str]
    rows: list[int]
    dim: int

    @property
    def total(self) -> int:
        return sum(self.rows)


def embedding_shards(run_dir: str) -> ShardSet:
    """Every committed embeddings shard, checked to share one dimension (from metadata only)."""
    uris = storage.list_shards(storage.join(run_dir, EMBEDDINGS_DIR))
    if not uris:
        raise ValueError(
            f"no embeddings under {storage.join(run_dir, EMBEDDINGS_DIR)!r}: run `semclust embed` "
            "(or `semclust run`) on this run directory first"
        )
    rows: list[int] = []
    dims: dict[int, str] = {}
    for uri in uris:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f)
            rows.append(meta.metadata.num_rows)
            dims.setdefault(meta.schema_arrow.field("embedding").type.list_size, uri)
    if len(dims) > 1:
        detail = ", ".join(f"{d} (e.g. {u})" for d, u in dims.items())
        raise ValueError(
            f"embeddings shards have mixed dimensions: {detail}; the run directory mixes runs of "
            "different backbones; re-embed with --mode overwrite"
        )
    return ShardSet(uris, rows, next(iter(dims)))


def check_finite(vectors: np.ndarray, where: str) -> None:
    """Refuse NaN/inf and all-zero vectors: they poison k-means and cosine similarity."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} embeddings in {where} contain NaN or inf")
    zero = ~vectors.any(axis=1)
    if zero.any():
        raise ValueError(f"{int(zero.sum())} embeddings in {where} are all zeros")


def sample_rows(shards: ShardSet, size: int, seed: int) -> np.ndarray:
    """A seeded uniform sample of ``size`` rows (float32 (size, D)) read shard by shard."""
    total = shards.total
    size = min(size, total)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=size, replace=False))
    out = np.empty((size, shards.dim), dtype=np.float32)
    filled = 0
    offset = 0
    for uri, n in zip(shards.uris, shards.rows, strict=True):
        local = chosen[(chosen >= offset) & (chosen < offset + n)] - offset
        if len(local):
            _, vectors = read_embeddings(uri)
            out[filled : filled + len(local)] = vectors[local]
            filled += len(local)
        offset += n
    check_finite(out, "the training sample")
    return out


def normalize_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
