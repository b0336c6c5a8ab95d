"""Re-ranking a compressed index's shortlist with the vectors themselves, from disk.

An IVF-PQ index that fits a memory budget ranks neighbours by approximate (PQ) distances, so
many true neighbours fall just outside its top 10. With ``index.rerank`` the index stage also
writes every row, in similarity space, as float16 to ``index/vectors.f16.npy`` (row r is index
row r); a search asks the index for ``rerank_factor * k`` candidates and orders them by their
exact similarity to the query. The file is memory-mapped, not loaded: only the candidates' rows
are read, and the operating system's page cache holds the hot ones, so it does not count against
the index's memory budget (as clip-retrieval serves an index far larger than its RAM).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from semclust import storage

RERANK_DTYPE = np.float16  # half the bytes of float32; cosines move by ~1e-3 at most


def load_vectors(uri: str) -> np.ndarray:
    """The re-rank vectors float16 (N, D), memory-mapped (from object storage: from the local
    copy ``storage.local_copy`` downloads once per version)."""
    return np.load(storage.local_copy(uri), mmap_mode="r", allow_pickle=False)


@contextmanager
def vectors_writer(uri: str, n: int, dim: int) -> Iterator[np.ndarray]:
    """A writable float16 (N, D) array, filled by the caller, stored at ``uri`` when the block
    ends without an error (written in a local temporary file first: it can exceed memory)."""
    from numpy.lib.format import open_memmap

    directory = None
    if not storage.is_remote(uri):
        directory = os.path.dirname(storage.resolve(uri)[1])
        os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npy", dir=directory)
    os.close(fd)
    try:
        array = open_memmap(tmp, mode="w+", dtype=RERANK_DTYPE, shape=(n, dim))
        yield array
        array.flush()
        del array
        if directory is not None:  # local: the temporary file is beside it, a rename will do
            os.replace(tmp, storage.resolve(uri)[1])
        else:
            storage.upload_file(tmp, uri)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def rerank(
    queries: np.ndarray, candidates: np.ndarray, vectors: Any, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of each query's candidate rows by exact similarity.

    ``queries`` float32 (n, D) in similarity space, ``candidates`` int64 (n, s) index rows (-1:
    none), ``vectors`` the (N, D) re-rank array. Returns (rows int64 (n, k), similarities float32
    (n, k)): the cosine for ``cosine``, minus the squared L2 distance for ``l2``; -1 / -inf where
    there were fewer than k candidates.
    """
    n, s = candidates.shape
    valid = candidates >= 0
    flat = np.where(valid, candidates, 0).ravel()
    # Sorted, unique rows: the memory-mapped reads go through the file once, in order.
    unique, inverse = np.unique(flat, return_inverse=True)
    rows = np.asarray(vectors[unique], dtype=np.float32)[inverse].reshape(n, s, -1)
    dots = np.einsum("nd,nsd->ns", queries, rows)
    if metric == "cosine":
        sims = dots
    else:
        sims = 2.0 * dots - np.einsum("nd,nd->n", queries, queries)[:, None]
        sims -= np.einsum("nsd,nsd->ns", rows, rows)
    sims = np.where(valid, sims, -np.inf).astype(np.float32)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    best_rows = np.take_along_axis(np.where(valid, candidates, -1), order, axis=1)
    best_sims = np.take_along_axis(sims, order, axis=1)
    if best_rows.shape[1] < k:  # fewer candidates than k: pad
        pad = k - best_rows.shape[1]
        best_rows = np.pad(best_rows, ((0, 0), (0, pad)), constant_values=-1)
        best_sims = np.pad(best_sims, ((0, 0), (0, pad)), constant_values=-np.inf)
    return best_rows, best_sims


def search_rows(
    index: Any,
    spec: Any,
    queries: np.ndarray,
    k: int,
    vectors: Any = None,
    factor: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """(index rows int64 (n, k), similarities float32 (n, k)) of float32 (n, D) ``queries``
    already in similarity space: the index's own ranking, or with ``vectors`` its top
    ``factor * k`` re-ranked exactly (``rerank``).

    An IVF search whose probed lists hold fewer than k rows (a small nprobe, small lists) would
    answer with fewer than k hits: those queries are searched again with nprobe doubled until
    they get k (or every list is probed)."""
    rows, sims = _search_once(index, spec, queries, k, vectors, factor)
    short = rows[:, -1] < 0
    ivf = _cpu_ivf(index) if short.any() else None
    if ivf is None:
        return rows, sims
    nprobe = ivf.nprobe
    try:
        while short.any() and ivf.nprobe < ivf.nlist:
            ivf.nprobe = min(ivf.nlist, 2 * ivf.nprobe)
            rows[short], sims[short] = _search_once(index, spec, queries[short], k, vectors, factor)
            short = rows[:, -1] < 0
    finally:
        ivf.nprobe = nprobe
    return rows, sims


def _cpu_ivf(index: Any) -> Any:
    import faiss

    try:
        return faiss.try_extract_index_ivf(index)
    except (AttributeError, RuntimeError, TypeError):  # a GPU index: FAISS fills its answers
        return None


def _search_once(
    index: Any, spec: Any, queries: np.ndarray, k: int, vectors: Any, factor: int
) -> tuple[np.ndarray, np.ndarray]:
    if vectors is None:
        scores, rows = index.search(queries, k)
        sims = np.where(rows >= 0, spec.to_similarity(scores), -np.inf).astype(np.float32)
        return rows, sims
    _, candidates = index.search(queries, max(k, factor * k))
    return rerank(queries, candidates, vectors, k, spec.metric)
