"""Reading a run's embeddings: committed shards, checked dims, row counts, seeded samples, and
the image id -> row lookup every later stage uses."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semclust import storage
from semclust.errors import UserError
from semclust.rundir.layout import EMBEDDINGS


@dataclass(frozen=True)
class ShardSet:
    """The committed embeddings shards of a run: URIs, rows per shard and the common dim."""

    uris: list[str]
    rows: list[int]
    dim: int

    @property
    def total(self) -> int:
        return sum(self.rows)

    def fingerprint(self) -> str:
        """Changes when a shard is added, removed or rewritten with another row count."""
        names = [f"{u.rsplit('/', 1)[-1]}:{n}" for u, n in zip(self.uris, self.rows, strict=True)]
        return hashlib.blake2b("\n".join(names).encode(), digest_size=8).hexdigest()


def read_embeddings(shard_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(image_id int64 (n,), embedding float32 (n, D)) of one embeddings shard."""
    table = storage.read_parquet(shard_uri, columns=["image_id", "embedding"])
    ids = table.column("image_id").to_numpy()
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    values = pc.list_flatten(col).to_numpy(zero_copy_only=False)
    return ids, np.asarray(values, dtype=np.float32).reshape(-1, dim)


def embedding_shards(run_dir: str) -> ShardSet:
    """Every committed embeddings shard, checked to share one dimension (from metadata only)."""
    uris = storage.list_shards(storage.join(run_dir, EMBEDDINGS))
    if not uris:
        raise UserError(
            f"no embeddings under {storage.join(run_dir, EMBEDDINGS)!r}: run `semclust embed` "
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


@dataclass
class RunRows:
    """Every embedded row of a run, in shard order: ids int64 (n,), shard URIs and offsets.

    Only ids are held (8 bytes a row); embeddings are read shard by shard when needed.
    """

    ids: np.ndarray
    shard_uris: list[str]
    offsets: np.ndarray  # int64 (shards + 1,)
    dim: int
    uris: list[str] | None = None  # each row's image URI, when loaded ``with_uris``

    def __post_init__(self) -> None:
        self._order = np.argsort(self.ids, kind="stable")

    @classmethod
    def load(cls, run_dir: str, *, with_uris: bool = False) -> RunRows:
        shards = embedding_shards(run_dir)
        columns = ["image_id", "uri"] if with_uris else ["image_id"]
        tables = [storage.read_parquet(u, columns) for u in shards.uris]
        ids = np.concatenate([t.column("image_id").to_numpy() for t in tables])
        offsets = np.concatenate([[0], np.cumsum([t.num_rows for t in tables])]).astype(np.int64)
        uris = [u for t in tables for u in t.column("uri").to_pylist()] if with_uris else None
        return cls(ids, list(shards.uris), offsets, shards.dim, uris)

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Rows int64 (same shape) of image ids; -1 for ids that are not in the run."""
        return rows_of_ids(self.ids, self._order, image_ids)

    def shards(self) -> Iterator[tuple[str, slice]]:
        """(embeddings shard URI, its rows) in order."""
        for i, uri in enumerate(self.shard_uris):
            yield uri, slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def embeddings(self) -> Iterator[tuple[str, slice, np.ndarray]]:
        """(shard URI, its rows, L2-normalised embeddings float32 (rows, D)) shard by shard."""
        for uri, rows in self.shards():
            ids, vectors = read_checked(uri, self.dim)
            if not np.array_equal(ids, self.ids[rows]):
                raise RuntimeError(f"{uri} changed while it was read; run the stage again")
            yield uri, rows, normalize_rows(vectors)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """L2-normalised embeddings float32 (m, D) of the given rows (any order): only the
        shards holding one of them are read."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        bounds = np.searchsorted(rows[order], self.offsets)  # order[bounds[i]:bounds[i+1]]: shard i
        for i in np.flatnonzero(np.diff(bounds)):
            uri = self.shard_uris[i]
            span = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
            ids, vectors = read_checked(uri, self.dim)
            if not np.array_equal(ids, self.ids[span]):
                raise RuntimeError(f"{uri} changed while it was read; run the stage again")
            wanted = order[bounds[i] : bounds[i + 1]]
            out[wanted] = normalize_rows(vectors[rows[wanted] - span.start])
        return out


def check_finite(vectors: np.ndarray, where: str) -> None:
    """Refuse NaN/inf and all-zero vectors: they poison k-means and cosine similarity."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} embeddings in {where} contain NaN or inf")
    zero = ~vectors.any(axis=1)
    if zero.any():
        raise ValueError(f"{int(zero.sum())} embeddings in {where} are all zeros")


def read_checked(uri: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(image_id int64 (n,), embedding float32 (n, D)) of a shard, refusing a wrong D, NaN, 0."""
    ids, vectors = read_embeddings(uri)
    if vectors.shape[1] != dim:
        raise ValueError(
            f"{uri} holds {vectors.shape[1]}-d embeddings but {dim}-d were expected; the run "
            "directory mixes runs of different backbones"
        )
    check_finite(vectors, uri)
    return ids, vectors


_SAMPLE_READERS = 4  # shards read at once: reads wait on storage, decoding releases the GIL


def sample_rows(
    shards: ShardSet, size: int, seed: int, *, with_ids: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """A seeded uniform sample of ``size`` rows, read shard by shard (a few at once).

    Returns float32 (size, D) rows in shard order, or (image_id int64 (size,), rows) with
    ``with_ids``. Only the chosen rows of each shard are kept, so memory is the sample's plus a
    few shards; shards without a chosen row are not read.
    """
    from concurrent.futures import ThreadPoolExecutor

    total = shards.total
    size = min(size, total)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=size, replace=False))
    offsets = np.concatenate([[0], np.cumsum(shards.rows)]).astype(np.int64)
    bounds = np.searchsorted(chosen, offsets)  # chosen[bounds[i]:bounds[i+1]] are shard i's
    out = np.empty((size, shards.dim), dtype=np.float32)
    out_ids = np.empty(size, dtype=np.int64)

    def fill(i: int) -> None:
        ids, vectors = read_checked(shards.uris[i], shards.dim)
        local = chosen[bounds[i] : bounds[i + 1]] - offsets[i]
        out[bounds[i] : bounds[i + 1]] = vectors[local]
        out_ids[bounds[i] : bounds[i + 1]] = ids[local]

    wanted = np.flatnonzero(np.diff(bounds)).tolist()
    with ThreadPoolExecutor(_SAMPLE_READERS) as pool:
        # The pool's threads start without the caller's storage settings: each read carries them.
        for _ in pool.map(storage.carry(fill), wanted):
            pass
    return (out_ids, out) if with_ids else out


def sample_size(wanted: int, dim: int, max_bytes: int) -> int:
    """``wanted`` rows, fewer if float32 rows of ``dim`` would take more than ``max_bytes``."""
    return max(1, min(wanted, max_bytes // (4 * dim)))


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows of float (n, D) scaled to unit L2 norm, as float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def rows_of_ids(ids: np.ndarray, order: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
    """Rows int64 (shape of ``image_ids``) of ``image_ids`` in ``ids``; -1 where one is absent.

    ``order`` is ``np.argsort(ids)``, computed once by the caller for many lookups.
    """
    flat = np.asarray(image_ids, dtype=np.int64).ravel()
    if not len(ids):
        return np.full(np.shape(image_ids), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(ids, flat, sorter=order), len(ids) - 1)
    rows = order[pos]
    return np.where(ids[rows] == flat, rows, -1).reshape(np.shape(image_ids))


def read_clusters(run_dir: str, folder: str, rows: Any) -> np.ndarray:
    """Cluster int64 (n,) of each of ``rows`` (anything with ``ids`` and ``rows_of``) from an
    assignments folder (``assignments``, ``assignments_scan``, ...); -1 where a row has none."""
    out = np.full(len(rows.ids), -1, dtype=np.int64)
    for uri in storage.list_shards(storage.join(run_dir, folder)):
        table = storage.read_parquet(uri, ["image_id", "cluster"])
        where = rows.rows_of(table.column("image_id").to_numpy())
        ok = where >= 0
        out[where[ok]] = table.column("cluster").to_numpy()[ok]
    return out
