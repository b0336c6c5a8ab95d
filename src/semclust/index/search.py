"""``semclust search``: nearest images to query images or image ids, from a run's index alone.

Loading reads ``index/meta.json``, ``index/index.faiss`` and ``index/ids.parquet`` only; queries
by image file, URI or folder are embedded with the run's own embedder settings (from meta.json),
queries by ``image_id`` use the vector stored in the index (exact for Flat, HNSW and IVF-Flat, the
PQ reconstruction for IVF-PQ).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from semclust import runinfo, storage
from semclust.embed.decode import ImageDecodeError, decode_image
from semclust.errors import UserError
from semclust.index.exact import similarity_space
from semclust.index.factory import IndexSpec
from semclust.index.faiss_ops import (
    load_index,
    resolve_gpus,
    set_search_params,
    to_gpus,
)
from semclust.index.rerank import load_vectors, search_rows
from semclust.rundir.tables import (
    INDEX_FILE,
    INDEX_FORMAT,
    INDEX_META,
    index_file,
    read_index_ids,
)

log = logging.getLogger(__name__)

_DECODE_CHUNK = 256  # query images decoded and embedded per round, bounding memory


@dataclass(frozen=True)
class Hit:
    rank: int
    image_id: int
    uri: str
    similarity: float
    frame_time: float | None = None  # a video frame's time (seconds); None for a still image

    @property
    def label(self) -> str:
        """The URI, with ``@ m:ss.s`` for a video frame."""
        from semclust.rundir.frames import frame_label

        return frame_label(self.uri, self.frame_time)


class SearchIndex:
    """A run's FAISS index and row -> (image_id, URI) map, loaded without the embeddings.

    ``nprobe``/``ef_search`` override the defaults stored at build time; ``backbone``, when
    given, must be the one the index was built from; ``device`` moves IVF/Flat indexes onto the
    GPUs with ``auto``/``gpu`` where FAISS sees any.
    """

    def __init__(
        self,
        run_dir: str,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
        backbone: str | None = None,
        device: str = "auto",
    ) -> None:
        meta_uri = index_file(run_dir, INDEX_META)
        if not storage.exists(meta_uri):
            raise UserError(f"{run_dir!r} has no complete index: run `semclust index` first")
        self.meta: dict[str, Any] = storage.read_json(meta_uri)
        if self.meta.get("format") != INDEX_FORMAT:
            raise UserError(
                f"the index in {run_dir!r} was built by an older semclust; rebuild it with "
                f"`semclust index --run-dir {run_dir} --mode overwrite`"
            )
        built_from = self.meta["embedder"]
        current = runinfo.load(run_dir).get("stages", {}).get("embed", {}).get("embedder")
        if current and current != built_from:
            raise UserError(
                f"the index in {run_dir!r} was built from {built_from['backbone']} embeddings "
                f"({built_from['weights']} weights) but the run's embeddings now come from "
                f"{current['backbone']} ({current['weights']}); rebuild it with `semclust index "
                f"--run-dir {run_dir} --mode overwrite`"
            )
        if backbone is not None and backbone != built_from["backbone"]:
            raise UserError(
                f"the index in {run_dir!r} holds {built_from['backbone']} embeddings, not "
                f"{backbone}: queries must be embedded by the backbone the run used; search "
                "another run directory or leave --backbone out"
            )
        self.spec = IndexSpec(**{k: v for k, v in self.meta["spec"].items() if k != "factory"})
        self.cpu_index = load_index(index_file(run_dir, INDEX_FILE), mmap=True)
        self.index = self.cpu_index
        gpus = resolve_gpus(device, "search") if self.spec.kind != "hnsw" else 0
        if gpus:
            try:
                self.index = to_gpus(self.cpu_index, shard=False)
            except RuntimeError as exc:  # e.g. a PQ code size the GPU kernels do not support
                if device == "gpu":
                    raise
                log.warning(
                    "%s cannot run on the GPU (%s): searching on CPU", self.spec.factory, exc
                )
                gpus = 0
        set_search_params(
            self.index,
            nprobe=nprobe or self.meta.get("nprobe"),
            ef_search=ef_search or self.meta.get("ef_search"),
            on_gpu=gpus > 0,
        )
        # IVF-PQ's shortlist re-ranked from the float16 vectors on disk (memory-mapped).
        rerank = self.meta.get("rerank")
        self.rerank_vectors = load_vectors(index_file(run_dir, rerank["file"])) if rerank else None
        self.rerank_factor = int(rerank["factor"]) if rerank else 1
        self.image_ids, chunked_uris, self.frame_times = read_index_ids(run_dir)
        # One array with 64-bit offsets: ``take`` of a few rows is then a few lookups, where on
        # the chunked column it costs a pass over every chunk (7 ms a query at 10^6 rows).
        self.uris = chunked_uris.cast(pa.large_string()).combine_chunks()
        if len(self.image_ids) != self.index.ntotal:
            raise UserError(
                f"index/ids.parquet has {len(self.image_ids)} rows but the index holds "
                f"{self.index.ntotal}; rebuild with `semclust index --mode overwrite`"
            )
        self._id_order: np.ndarray | None = None
        self._embedder: Any = None

    @property
    def embedder(self) -> Any:
        """The run's own backbone, with the run's own settings (built on first use)."""
        if self._embedder is None:
            from semclust.embed.actors import EmbedderSpec

            self._embedder = EmbedderSpec(**self.meta["embedder"]).build()
        return self._embedder

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k hits for each float32 (n, D) query vector, most similar first."""
        if vectors.ndim != 2 or vectors.shape[1] != self.meta["dim"]:
            raise UserError(
                f"query vectors have shape {vectors.shape} but the index holds "
                f"{self.meta['dim']}-d embeddings"
            )
        k = min(k, int(self.index.ntotal))
        rows, sims = search_rows(
            self.index,
            self.spec,
            similarity_space(vectors, self.spec.metric),
            k,
            self.rerank_vectors,
            self.rerank_factor,
        )
        valid = rows >= 0
        uris = self.uris.take(rows[valid]).to_pylist()
        ids = self.image_ids[rows[valid]]
        times = self.frame_times[rows[valid]]
        out: list[list[Hit]] = []
        pos = 0
        for row_valid, row_sims in zip(valid, sims, strict=True):
            hits = []
            for rank, sim in enumerate(row_sims[row_valid]):
                t = float(times[pos])
                hits.append(
                    Hit(rank + 1, int(ids[pos]), uris[pos], float(sim), None if t != t else t)
                )
                pos += 1
            out.append(hits)
        return out

    def vectors_of(self, image_ids: list[int]) -> np.ndarray:
        """The stored vectors float32 (n, D) of image ids (IVF-PQ: the re-rank vectors, else
        PQ-decoded)."""
        import faiss

        if self._id_order is None:
            self._id_order = np.argsort(self.image_ids, kind="stable")
            if self.spec.kind.startswith("ivf"):
                faiss.extract_index_ivf(self.cpu_index).make_direct_map()
        wanted = np.asarray(image_ids, dtype=np.int64)
        pos = np.searchsorted(self.image_ids, wanted, sorter=self._id_order)
        pos = np.minimum(pos, len(self._id_order) - 1)
        rows = self._id_order[pos]
        missing = wanted[self.image_ids[rows] != wanted]
        if len(missing):
            raise UserError(f"image_id {int(missing[0])} is not in this run's index")
        if self.rerank_vectors is not None:
            return np.asarray(self.rerank_vectors[rows], dtype=np.float32)
        return np.stack([self.cpu_index.reconstruct(int(r)) for r in rows]).astype(np.float32)

    def search_ids(self, image_ids: list[int], k: int) -> list[list[Hit]]:
        """Top-k hits for images already in the index (each usually finds itself first)."""
        return self.search_vectors(self.vectors_of(image_ids), k)

    def search_images(self, images: list[str], k: int) -> list[list[Hit]]:
        """Embed image files/URIs like the run did and search; a bad image raises with its name."""
        spec = self.meta["embedder"]
        out: list[list[Hit]] = []
        for s in range(0, len(images), _DECODE_CHUNK):
            pixels = []
            for uri in images[s : s + _DECODE_CHUNK]:
                try:
                    decoded = decode_image(
                        storage.read_bytes(uri), spec["input_size"], spec["resize"]
                    )
                except (ImageDecodeError, OSError) as exc:
                    raise UserError(f"query image {uri!r} cannot be used: {exc}") from exc
                pixels.append(decoded.pixels)
            out.extend(self.search_vectors(self.embedder.embed(np.stack(pixels)), k))
        return out


def expand_queries(paths: list[str]) -> list[str]:
    """Files and URIs as given; folders (local or object storage) expanded to their images."""
    from semclust.embed.sources import list_images

    out: list[str] = []
    for p in paths:
        if storage.is_dir(p):
            out.extend(list_images(p).uris)
        elif storage.exists(p):
            out.append(p if storage.is_remote(p) else str(Path(p).resolve()))
        else:
            raise UserError(f"query image {p!r} does not exist")
    if not out:
        raise UserError("no query images given")
    return out
