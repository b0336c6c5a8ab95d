"""``semclust search``: nearest images to query images, from a run's index alone."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semclust import storage
from semclust.clustering.shards import normalize_rows
from semclust.embed.decode import ImageDecodeError, decode_image
from semclust.index.build import INDEX_DIR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    rank: int
    image_id: int
    uri: str
    similarity: float


class SearchIndex:
    """A run's FAISS index and id -> URI map, loaded without the embeddings."""

    def __init__(self, run_dir: str) -> None:
        import faiss

        index_dir = storage.join(run_dir, INDEX_DIR)
        meta_uri = storage.join(index_dir, "meta.json")
        if not storage.exists(meta_uri):
            raise ValueError(f"{run_dir!r} has no complete index: run `semclust index` first")
        self.meta: dict[str, Any] = storage.read_json(meta_uri)
        raw = storage.read_bytes(storage.join(index_dir, "index.faiss"))
        self.index = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
        ids = storage.read_parquet(storage.join(index_dir, "ids.parquet"))
        self.uri_of = dict(
            zip(ids.column("image_id").to_pylist(), ids.column("uri").to_pylist(), strict=True)
        )
        self._embedder: Any = None

    @property
    def embedder(self) -> Any:
        """The run's own backbone, with the run's own settings (built on first use)."""
        if self._embedder is None:
            from semclust.embed.pipeline import EmbedderSpec

            self._embedder = EmbedderSpec(**self.meta["embedder"]).build()
        return self._embedder

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k hits for each float32 (n, D) query vector."""
        if vectors.shape[1] != self.meta["dim"]:
            raise ValueError(
                f"query vectors have dimension {vectors.shape[1]} but the index holds "
                f"{self.meta['dim']}-d embeddings"
            )
        x = normalize_rows(vectors) if self.meta["metric"] == "cosine" else vectors
        scores, ids = self.index.search(np.ascontiguousarray(x, dtype=np.float32), k)
        if self.meta["metric"] == "l2":
            scores = -scores
        return [
            [
                Hit(rank + 1, int(i), self.uri_of[int(i)], float(s))
                for rank, (i, s) in enumerate(zip(row_ids, row_scores, strict=True))
                if i >= 0
            ]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]

    def search_images(self, images: list[str], k: int) -> list[list[Hit]]:
        """Embed image files/URIs like the run did and search; a bad image raises with its name."""
        spec = self.meta["embedder"]
        pixels = []
        for uri in images:
            try:
                decoded = decode_image(storage.read_bytes(uri), spec["input_size"], spec["resize"])
            except (ImageDecodeError, OSError) as exc:
                raise ValueError(f"query image {uri!r} cannot be used: {exc}") from exc
            pixels.append(decoded.pixels)
        vectors = self.embedder.embed(np.stack(pixels))
        return self.search_vectors(vectors, k)


def expand_queries(paths: list[str]) -> list[str]:
    """Files as given; folders expanded to the images inside them (sorted)."""
    from semclust.embed.pipeline import list_images

    out: list[str] = []
    for p in paths:
        if storage.is_dir(p):
            out.extend(list_images(p).uris)
        elif storage.exists(p):
            out.append(p if storage.is_remote(p) else str(Path(p).resolve()))
        else:
            raise ValueError(f"query image {p!r} does not exist")
    if not out:
        raise ValueError("no query images given")
    return out
