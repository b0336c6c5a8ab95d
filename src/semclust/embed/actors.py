"""The embed stage's Ray Data workers: ``decode_stage`` (CPU tasks: read + decode + resize a batch
of URIs) and ``EmbedActor`` (the actor pool: one model per actor, one model call per batch),
built from ``EmbedderSpec``. The stage binds both to the run's storage settings
(``RunContext.bind``), so they need no storage argument.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from semclust import storage
from semclust.config import EmbedConfig
from semclust.embed.backbones import get_backbone
from semclust.embed.decode import decode_batch
from semclust.embed.sources import read_image_bytes
from semclust.embed.video import decode_video_rows
from semclust.embed.writer import DEFERRED
from semclust.retry import is_denied, is_transient, retry_call

_READ_THREADS = 8  # object-store reads are latency-bound; overlap them within a batch


@dataclass(frozen=True)
class EmbedderSpec:
    """What an actor needs to build its model; small and picklable (the model is built there)."""

    backbone: str
    weights: str
    input_size: int
    resize: str
    batch_size: int
    normalize: bool
    seed: int
    keras_backend: str
    threads: int | None = None  # TensorFlow intra-op threads on CPU; None: TF's default
    precision: str = "auto"  # auto: mixed float16 on GPU, float32 on CPU
    xla: bool | None = None  # None: XLA on GPU only
    weights_sha256: str | None = None

    @classmethod
    def from_config(cls, ec: EmbedConfig, *, threads: int | None = None) -> EmbedderSpec:
        """The actors' settings; ``threads``: the model's threads per actor when the config
        leaves them open (``embed.resources.plan`` chooses them from the cluster)."""
        spec = get_backbone(ec.backbone)
        threads = ec.threads if ec.threads is not None else threads
        return cls(
            backbone=ec.backbone,
            weights=ec.weights,
            input_size=ec.image_size or spec.input_size,
            resize=ec.resize,
            batch_size=ec.batch_size,
            normalize=ec.normalize,
            seed=ec.seed,
            keras_backend=ec.keras_backend,
            threads=threads,
            precision=ec.precision,
            xla=ec.xla,
            weights_sha256=ec.weights_sha256,
        )

    def build(self) -> Any:
        from semclust.embed.backbones import Embedder

        return Embedder(
            self.backbone,
            self.weights,
            input_size=self.input_size,
            batch_size=self.batch_size,
            normalize=self.normalize,
            seed=self.seed,
            keras_backend=self.keras_backend,
            threads=self.threads,
            precision=self.precision,
            xla=self.xla,
            weights_sha256=self.weights_sha256,
        )


_FIRST_PROBE_SECONDS = 2.0  # a down store is asked again after this, doubling each time
_MAX_PROBE_SECONDS = 30.0


@dataclass
class _StoreDown:
    error: str  # the read error that tripped it
    probe_at: float  # time.monotonic() of the next question whether it is back
    interval: float = _FIRST_PROBE_SECONDS


# Stores (``s3://bucket``) whose reads in this process ran out of ``storage.retry_seconds``
# while the bucket itself did not answer. While one stays down, the reads of its images are
# deferred at once instead of each riding out the whole budget again: a store away for an
# hour leaves the run in seconds, not after a budget per image.
_STORES_DOWN: dict[str, _StoreDown] = {}


def _still_down(store: str, uri: str) -> _StoreDown | None:
    """The store's down record while it still does not answer; None once it does."""
    down = _STORES_DOWN.get(store)
    if down is None:
        return None
    now = time.monotonic()
    if now < down.probe_at:
        return down
    # Claimed before the question, so that the other reader threads do not ask it too.
    down.probe_at = now + down.interval
    if not storage.bucket_reachable(uri, max_age=0):
        down.interval = min(2 * down.interval, _MAX_PROBE_SECONDS)
        down.probe_at = time.monotonic() + down.interval
        return down
    _STORES_DOWN.pop(store, None)
    return None


def _store_of(uri: str) -> str | None:
    if not storage.is_remote(uri):
        return None
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def read_one(item: tuple[str, int, int]) -> tuple[bytes | None, str, bool]:
    """(bytes or None, error, transient) of one (uri, offset, size): a read problem is this
    image's, not the batch's."""
    uri = item[0]
    store = _store_of(uri)
    down = _still_down(store, uri) if store is not None else None
    if down is not None:
        return None, f"read deferred: {store} is unreachable ({down.error})", True
    policy = storage.retry_policy()
    try:
        return retry_call(lambda: read_image_bytes(*item), policy, f"read {uri}"), "", False
    except Exception as exc:
        # A 403 is the object's only when the bucket still answers (else: expired credentials).
        denied_all = is_denied(exc) and store is not None and not storage.bucket_reachable(uri)
        transient = is_transient(exc) or denied_all
        error = f"read failed: {type(exc).__name__}: {storage.redact(str(exc))}"
        if transient and store is not None and not storage.bucket_reachable(uri, max_age=0):
            _STORES_DOWN[store] = _StoreDown(error[:500], time.monotonic() + _FIRST_PROBE_SECONDS)
        return None, error, transient


def decode_stage(
    batch: dict[str, np.ndarray], size: int, resize: str, max_pixels: int
) -> dict[str, np.ndarray]:
    """Ray Data CPU task: read bytes and decode a batch of URIs into fixed-size uint8 pixels.

    ``batch``: ``uri``, ``offset``, ``size``, ``frame_time`` (NaN for a still image) and the
    part's bookkeeping (``frame_index``, ``part``, ``part_rows``: ``embed.todo``), passed
    through. Still images are read whole (threaded) and decoded by ``decode_batch``; the frames
    of each video are decoded together (``video.decode_video_rows``, one open and in-order
    seeks per video). Returns ``uri``, ``pixels`` (n, size, size, 3) uint8, ``width``/``height``
    (n,) int32, ``error``/``error_stage`` ("" where the image is fine) and the columns passed
    through.
    """
    uris = [str(u) for u in batch["uri"]]
    n = len(uris)
    offsets, sizes = batch["offset"].tolist(), batch["size"].tolist()
    frame_times = np.asarray(batch.get("frame_time", np.full(n, np.nan)), dtype=np.float64)
    still = [i for i in range(n) if np.isnan(frame_times[i])]
    videos: dict[tuple[str, int, int], list[int]] = {}
    for i in range(n):
        if not np.isnan(frame_times[i]):
            videos.setdefault((uris[i], offsets[i], sizes[i]), []).append(i)
    errors = np.full(n, "", dtype=object)
    stages = np.full(n, "", dtype=object)
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    widths = np.zeros(n, dtype=np.int32)
    heights = np.zeros(n, dtype=np.int32)
    # The pool's threads start with no storage settings: each read carries this task's.
    read = storage.carry(read_one)
    frames = storage.carry(decode_video_rows)
    with ThreadPoolExecutor(min(_READ_THREADS, max(1, n))) as pool:
        pending = {
            key: pool.submit(
                frames, *key, [float(frame_times[i]) for i in rows], size, resize, max_pixels
            )
            for key, rows in videos.items()
        }
        reads = list(pool.map(read, [(uris[i], offsets[i], sizes[i]) for i in still]))
        if still:
            blobs = [b for b, _, _ in reads]
            px, w, h, decode_errors = decode_batch(blobs, size, resize, max_pixels)
            pixels[still], widths[still], heights[still] = px, w, h
            for j, ((_, read_error, transient), decode_error) in enumerate(
                zip(reads, decode_errors, strict=True)
            ):
                if read_error:
                    errors[still[j]] = read_error
                    stages[still[j]] = DEFERRED if transient else "read"
                elif decode_error:
                    errors[still[j]], stages[still[j]] = decode_error, "decode"
        for key, future in pending.items():
            for i, frame in zip(videos[key], future.result(), strict=True):
                if frame.error:
                    errors[i] = frame.error
                    stages[i] = DEFERRED if frame.transient else _video_stage(frame.error)
                else:
                    pixels[i], widths[i], heights[i] = frame.pixels, frame.width, frame.height
    # The part's bookkeeping (``part``, ``part_rows``) rides along to the writer unchanged.
    passed = {k: np.asarray(v) for k, v in batch.items() if k not in ("uri", "offset", "size")}
    return {
        **passed,
        "uri": np.asarray(uris, dtype=object),
        "pixels": pixels,
        "width": widths,
        "height": heights,
        "error": errors,
        "error_stage": stages,
    }


def _video_stage(error: str) -> str:
    return "read" if error.startswith("read failed") else "decode"


class EmbedActor:
    """Ray Data actor: builds the backbone once (its weights may live in object storage), then
    one model call per batch."""

    def __init__(self, spec: EmbedderSpec) -> None:
        self.embedder = spec.build()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = np.asarray(batch["error"], dtype=object)
        stages = np.asarray(batch["error_stage"], dtype=object)
        n = len(errors)
        ok = errors == ""
        emb = np.zeros((n, self.embedder.dim), dtype=np.float32)
        if ok.any():
            emb[ok] = self.embedder.embed(batch["pixels"][ok])
        bad = ok & ~np.isfinite(emb).all(axis=1)
        if bad.any():
            errors[bad] = "embedding is not finite (NaN or inf from the model)"
            stages[bad] = "embed"
            emb[bad] = 0.0
        out = {k: v for k, v in batch.items() if k != "pixels"}  # uri, part, sizes, ...
        out.update(embedding=emb, error=errors, error_stage=stages)
        return out
