"""Answering searches over a :class:`RunCatalog`: queries by upload, URI, image id or vector,
with optional cluster and label filters.

A filter that matches few rows (``EXACT_FILTER_ROWS``) is searched exactly over those rows'
stored vectors, kept for the next query with the same filter; a broad one asks the index for
more hits than wanted and keeps those that match, asking for more until it has k.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from semclust import storage
from semclust.embed.decode import ImageDecodeError, decode_image
from semclust.serve.batching import SearchBatcher
from semclust.serve.catalog import BadQuery, Forbidden, NotFound, RunCatalog
from semclust.storage.uris import image_id_for

EXACT_FILTER_ROWS = 65_536
_FILTER_CACHE_BYTES = 256 << 20  # vectors of recent filters kept for the next query


class QueryEngine:
    """Search for the service: the model (built on first use), the index, the filters."""

    def __init__(self, catalog: RunCatalog) -> None:
        self.catalog = catalog
        self._search_lock = threading.Lock()  # FAISS search parameters are per index, not call
        self._embed_lock = threading.Lock()
        self._filter_vectors: dict[tuple[int | None, int | None], tuple[np.ndarray, Any]] = {}
        self._embedder: Any = None
        self.batcher = SearchBatcher(self._index_search)

    # --- search --------------------------------------------------------------------------------

    @property
    def embedder_ready(self) -> bool:
        return self._embedder is not None

    def embedder(self) -> Any:
        """The run's backbone with the run's settings, built once (one image per model call)."""
        with self._embed_lock:
            if self._embedder is None:
                from semclust.embed.actors import EmbedderSpec

                settings = dict(self.catalog.index.meta["embedder"], batch_size=1)
                self._embedder = EmbedderSpec(**settings).build()
            return self._embedder

    def decode_query(self, data: bytes, what: str) -> np.ndarray:
        spec = self.catalog.index.meta["embedder"]
        try:
            decoded = decode_image(
                data, spec["input_size"], spec["resize"], self.catalog.max_pixels
            )
        except ImageDecodeError as exc:
            raise BadQuery(f"{what} is not an image semclust can read: {exc}") from None
        return decoded.pixels

    def embed_images(self, images: list[bytes], what: list[str]) -> np.ndarray:
        pixels = np.stack([self.decode_query(d, w) for d, w in zip(images, what, strict=True)])
        model = self.embedder()
        with self._embed_lock:
            return model.embed(pixels)

    def vectors_of_ids(self, image_ids: list[int]) -> np.ndarray:
        for i in image_ids:
            self.catalog.row_of(i)  # a NotFound names the first unknown id
        with self._search_lock:
            return self.catalog.index.vectors_of(image_ids)

    def vector_of_uri(self, uri: str) -> np.ndarray:
        """An image URI's vector: the stored one if the run has it, else the image embedded
        (only inside the folder or prefix the run's images came from)."""
        canonical = storage.canonical_uri(uri) if "://" in uri or uri.startswith("/") else uri
        row = int(self.catalog.rows_of(np.array([image_id_for(canonical)]))[0])
        if row >= 0 and self.catalog.index.uris[row].as_py() == canonical:
            return self.vectors_of_ids([int(self.catalog.index.image_ids[row])])[0]
        if not self.inside_sources(canonical):
            raise Forbidden(
                f"{uri!r} is neither an image of this run nor inside the folder its images came "
                "from; upload the image instead"
            )
        with storage.using(self.catalog.storage_config):
            try:
                data = storage.read_bytes(canonical)
            except (FileNotFoundError, IsADirectoryError):
                raise NotFound(f"{uri!r} does not exist") from None
        return self.embed_images([data], [uri])[0]

    def inside_sources(self, uri: str) -> bool:
        root = self.catalog.input_root
        if root is None or ".." in uri.split("/"):
            return False
        if storage.is_remote(root):
            return uri.startswith(root.rstrip("/") + "/")
        if not uri.startswith("file://") or not root.startswith("file://"):
            return False
        real = os.path.realpath(uri[len("file://") :])
        base = os.path.realpath(root[len("file://") :])
        return os.path.commonpath([real, base]) == base

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        *,
        cluster: int | None = None,
        label: str | None = None,
    ) -> list[list[dict[str, Any]]]:
        """Top-k hits of each query vector float32 (n, D), optionally only within a cluster
        and/or a label: image_id, uri, similarity, cluster and label, most similar first."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.catalog.index.meta["dim"]:
            raise BadQuery(
                f"a query vector needs {self.catalog.index.meta['dim']} numbers, got shape "
                f"{list(vectors.shape)}"
            )
        if not np.isfinite(vectors).all():
            raise BadQuery("a query vector holds NaN or infinity")
        if cluster is None and label is None:
            hits = self.batcher.search(vectors, k)
            rows = [self.catalog.rows_of(np.array([h.image_id for h in q])) for q in hits]
            sims = [[h.similarity for h in q] for q in hits]
        else:
            rows, sims = self._filtered(vectors, k, cluster, label)
        out = []
        for q_rows, q_sims in zip(rows, sims, strict=True):
            described = self.catalog.describe_rows(np.asarray(q_rows, dtype=np.int64))
            out.append(
                [
                    {"rank": r + 1, **d, "similarity": float(s)}
                    for r, (d, s) in enumerate(zip(described, q_sims, strict=True))
                ]
            )
        return out

    def _index_search(self, vectors: np.ndarray, k: int) -> list[list[Any]]:
        with self._search_lock:
            return self.catalog.index.search_vectors(vectors, k)

    def filter_mask(self, cluster: int | None, label: str | None) -> np.ndarray:
        mask = np.ones(self.catalog.n, dtype=bool)
        if cluster is not None:
            self.catalog.check_cluster(cluster)
            mask &= self.catalog.row_cluster == cluster
        if label is not None:
            code = self.catalog.label_code.get(label)
            if code is None:
                raise NotFound(f"no image of this run has the label {label!r}")
            mask &= self.catalog.row_label == code
        return mask

    def _filtered(
        self, queries: np.ndarray, k: int, cluster: int | None, label: str | None
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        from semclust.index.exact import similarity_space

        if cluster is not None:
            self.catalog.check_cluster(cluster)
        if label is not None and label not in self.catalog.label_code:
            raise NotFound(f"no image of this run has the label {label!r}")
        key = (cluster, self.catalog.label_code[label] if label is not None else None)
        cached = self._filter_vectors.get(key)
        if cached is None:
            mask = self.filter_mask(cluster, label)
            allowed = np.flatnonzero(mask)
            if len(allowed) > EXACT_FILTER_ROWS:
                return self._over_fetched(queries, k, mask, len(allowed))
            cached = (allowed, self._row_vectors(allowed))
            self._remember(key, cached)
        allowed, vectors = cached
        q = similarity_space(queries, self.catalog.index.spec.metric)
        sims = q @ vectors.T
        if self.catalog.index.spec.metric != "cosine":
            sims = 2 * sims - (q * q).sum(1)[:, None] - (vectors * vectors).sum(1)[None, :]
        top = min(k, len(allowed))
        best = np.argsort(-sims, axis=1, kind="stable")[:, :top]
        return [allowed[b] for b in best], list(np.take_along_axis(sims, best, axis=1))

    def _remember(self, key: tuple[int | None, int | None], entry: tuple[Any, Any]) -> None:
        """Keep a filter's rows and vectors for the next query, within _FILTER_CACHE_BYTES."""
        self._filter_vectors[key] = entry
        while len(self._filter_vectors) > 1 and (
            sum(v.nbytes for _, v in self._filter_vectors.values()) > _FILTER_CACHE_BYTES
        ):
            self._filter_vectors.pop(next(iter(self._filter_vectors)))

    def _over_fetched(
        self, queries: np.ndarray, k: int, mask: np.ndarray, allowed: int
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        fetch = min(self.catalog.n, max(2 * k, int(np.ceil(2 * k * self.catalog.n / allowed))))
        while True:
            with self._search_lock:
                hits = self.catalog.index.search_vectors(queries, fetch)
            rows = [self.catalog.rows_of(np.array([h.image_id for h in q])) for q in hits]
            kept = [r[mask[r]][:k] for r in rows]
            sims = [
                np.array([h.similarity for h in q], dtype=np.float32)[mask[r]][:k]
                for q, r in zip(hits, rows, strict=True)
            ]
            if fetch >= self.catalog.n or all(len(r) >= min(k, allowed) for r in kept):
                return kept, sims
            fetch = min(self.catalog.n, 4 * fetch)

    def _row_vectors(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors (similarity space) of index rows: the re-rank copy, else the index's
        own (PQ-decoded for IVF-PQ)."""
        if self.catalog.index.rerank_vectors is not None:
            return np.asarray(self.catalog.index.rerank_vectors[rows], dtype=np.float32)
        ids = self.catalog.index.image_ids[rows].tolist()
        with self._search_lock:
            return (
                self.catalog.index.vectors_of(ids)
                if ids
                else np.empty((0, self.catalog.index.meta["dim"]))
            )
