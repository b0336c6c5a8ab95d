"""The embed stage's Ray Data workers: ``decode_stage`` (CPU tasks: read + decode + resize a batch
of URIs) and ``EmbedActor`` (the actor pool: one model per actor, one model call per batch),
built from ``EmbedderSpec``. The stage binds both to the run's storage settings
(``RunContext.bind``), so they need no storage argument.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from semclust import storage
from semclust.config import EmbedConfig
from semclust.embed.backbones import get_backbone
from semclust.embed.decode import decode_batch
from semclust.embed.sources import read_image_bytes
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


def read_one(item: tuple[str, int, int]) -> tuple[bytes | None, str, bool]:
    """(bytes or None, error, transient) of one (uri, offset, size): a read problem is this
    image's, not the batch's."""
    policy = storage.retry_policy()
    try:
        return retry_call(lambda: read_image_bytes(*item), policy, f"read {item[0]}"), "", False
    except Exception as exc:
        # A 403 is the object's only when the bucket still answers (else: expired credentials).
        denied_all = (
            is_denied(exc) and storage.is_remote(item[0]) and not storage.bucket_reachable(item[0])
        )
        transient = is_transient(exc) or denied_all
        return None, f"read failed: {type(exc).__name__}: {storage.redact(str(exc))}", transient


def decode_stage(
    batch: dict[str, np.ndarray], size: int, resize: str, max_pixels: int
) -> dict[str, np.ndarray]:
    """Ray Data CPU task: read bytes and decode a batch of URIs into fixed-size uint8 pixels.

    ``batch``: ``uri``, ``offset``, ``size`` and the part's bookkeeping (``part``,
    ``part_rows``: ``embed.todo``), passed through. Returns ``uri``, ``pixels`` (n, size, size,
    3) uint8, ``width``/``height`` (n,) int32, ``error``/``error_stage`` ("" where the image is
    fine) and the columns passed through.
    """
    uris = [str(u) for u in batch["uri"]]
    items = list(zip(uris, batch["offset"].tolist(), batch["size"].tolist(), strict=True))
    # The pool's threads start with no storage settings: each read carries this task's.
    read = storage.carry(read_one)
    with ThreadPoolExecutor(min(_READ_THREADS, max(1, len(uris)))) as pool:
        reads = list(pool.map(read, items))
    blobs = [b for b, _, _ in reads]
    pixels, widths, heights, decode_errors = decode_batch(blobs, size, resize, max_pixels)
    errors = np.empty(len(uris), dtype=object)
    stages = np.empty(len(uris), dtype=object)
    for i, ((_, read_error, transient), decode_error) in enumerate(
        zip(reads, decode_errors, strict=True)
    ):
        if read_error:
            errors[i], stages[i] = read_error, DEFERRED if transient else "read"
        elif decode_error:
            errors[i], stages[i] = decode_error, "decode"
        else:
            errors[i], stages[i] = "", ""
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
