"""The embed stage: images -> ``embeddings/part-NNNNN.parquet`` and ``failures/part-NNNNN.parquet``.

Ray Data streams the work: read + decode + resize run as CPU tasks, the backbone runs in an
actor pool (one model per actor, one model call per batch; ``actors``), and the driver commits
each part (a fixed, numbered group of ``rows_per_part`` URIs) atomically once all its rows are
back (``writer``). The listing is streamed into the pipeline while it goes on (``feeder``), so the
first parts commit before the last page is listed; the driver holds the listed ids (8 bytes per
image) and a bounded window of rows, never the listing itself. A resumed run skips every URI
already in a committed part, so nothing is embedded twice or lost.

Images whose read still failed for a transient reason after the retry budget are committed
nowhere; the stage then stops with ``writer.ImagesDeferred`` (a ``StoreUnavailable``: a resume
embeds them).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from semclust import storage
from semclust.config import EmbedConfig
from semclust.context import RunContext
from semclust.embed.actors import EmbedActor, EmbedderSpec, decode_stage
from semclust.embed.backbones import get_backbone
from semclust.embed.feeder import (
    ListingFeeder,
    ListingProgress,
    feeder_dataset,
    rows_ahead,
    todo_blocks,
)
from semclust.embed.sources import InputStream
from semclust.embed.writer import PartWriter, check_counts, committed_state
from semclust.errors import UserError
from semclust.rundir import layout

log = logging.getLogger(__name__)

LIST_PAGE_SIZE = storage.LIST_PAGE_SIZE  # listing page (S3 keys per request); a config knob later

# What decides the embeddings: a resume into a run made with other values would mix two models.
MODEL_SETTINGS = ("backbone", "weights", "image_size", "resize", "normalize")


@dataclass
class _OpenListing:
    ctx: RunContext
    stream: InputStream
    pages: Iterator[pa.Table]  # from the first page on


def settings(ctx: RunContext) -> dict[str, Any]:
    """The model settings (``MODEL_SETTINGS``); checks the input, the weights and, on resume,
    that committed embeddings were made with the same model."""
    ec = ctx.cfg.embed
    if not ec.input:
        raise UserError("the embed stage needs an input: pass a folder, file:// or s3:// URI")
    _validate_weights(ec)
    chosen = {key: getattr(ec, key) for key in MODEL_SETTINGS}
    if ctx.mode == "resume":
        _check_resume_compatible(ctx, chosen)
    # The listing's first page is taken here, so that an input without images (or one that
    # cannot be read) stops before run_stage changes the run directory; run() goes on with the
    # same stream (for tar shards, the first page costs every tar's name and the first tar's
    # headers).
    stream, pages = _open_listing(ec.input)
    ctx.state["listing"] = _OpenListing(ctx, stream, pages)
    return chosen


def run(ctx: RunContext) -> dict[str, Any]:
    """Embed every listed image not yet in a committed part; the run.json record (counts,
    listing and throughput)."""
    ec = ctx.cfg.embed
    start = time.perf_counter()
    opened = ctx.state.pop("listing", None)
    if opened is not None and opened.ctx is ctx:
        stream, pages = opened.stream, opened.pages
    else:  # run() without settings() on this context
        stream, pages = _open_listing(str(ec.input))
    done, next_part = committed_state(ctx.run_dir)
    log.info(
        "embed: %d images already committed in %s; listing %s", len(done), ctx.run_dir, ec.input
    )
    progress = ListingProgress()
    block_rows = ec.decode_batch_size * 4
    blocks = todo_blocks(pages, done, next_part, ec.rows_per_part, block_rows, progress)
    first_block = next(blocks, None)  # nothing to do: no Ray needed
    spec = EmbedderSpec.from_config(ec)
    writer = PartWriter(ctx.run_dir, ec.rows_per_part, get_backbone(ec.backbone).dim)
    if first_block is not None:
        todo = itertools.chain([first_block], blocks)
        spec, writer = _embed(ctx, todo, stream, progress, block_rows, next_part)
    if not stream.done:
        raise RuntimeError("the listing did not reach its end")  # a bug, not a user error
    log.info(
        "embed: %d images listed, %d already committed, %d to do (%d pages, %.1f s listing)",
        stream.listed,
        progress.already_committed,
        progress.rows_sent,
        stream.pages_yielded,
        stream.seconds or 0.0,
    )
    seconds = time.perf_counter() - start
    listed_ids = stream.listed_ids()
    counts = check_counts(ctx.run_dir, listed_ids, writer.deferred, writer.deferred_error)
    processed = writer.rows_written
    return {
        "listed": len(listed_ids),
        "embedded": counts["embedded"],
        "failed": counts["failed"],
        "skipped_non_image": stream.skipped,
        "duplicate_uris": stream.duplicates,
        "stale_rows": counts["stale"],
        "already_committed": progress.already_committed,
        "processed_this_run": processed,
        "listing_pages": stream.pages_yielded,
        "listing_seconds": round(stream.seconds or 0.0, 3),
        "dim": writer.dim,
        "embedder": asdict(spec),
        "images_per_second": round(processed / seconds, 2) if processed else None,
    }


def summary(record: dict[str, Any]) -> str:
    return (
        f"listed {record['listed']}, embedded {record['embedded']}, failed {record['failed']}, "
        f"{record['images_per_second'] or '-'} img/s"
    )


def _embed(
    ctx: RunContext,
    blocks: Iterator[pa.Table],
    stream: InputStream,
    progress: ListingProgress,
    block_rows: int,
    next_part: int,
) -> tuple[EmbedderSpec, PartWriter]:
    """Stream ``blocks`` through Ray Data and commit every part; (the actors' spec, the writer).

    ``ctx.ensure_held`` (the run-directory lock's check) runs before every commit."""
    from semclust.ray_runtime import use_gpu

    ec = ctx.cfg.embed
    ctx.start_ray()
    gpu = use_gpu(ec.device)
    spec = EmbedderSpec.from_config(ec, gpu=gpu, cpus=_cpu_counts())
    feeder = ListingFeeder(blocks, rows_ahead(ec.batch_size, ec.decode_batch_size, block_rows))
    writer: PartWriter | None = None
    try:
        feeder.start()
        logged_parts = 0
        for batch in _pipeline(ctx, feeder.queue, spec, gpu).iter_batches(
            batch_size=None, batch_format="numpy"
        ):
            if writer is None:
                dim = int(np.asarray(batch["embedding"]).shape[1])
                writer = PartWriter(ctx.run_dir, ec.rows_per_part, dim, ctx.ensure_held)
            writer.add(batch)
            feeder.received_rows(len(batch["part"]))
            if writer.parts_committed != logged_parts:
                logged_parts = writer.parts_committed
                _log_progress(stream, progress, writer)
    finally:
        feeder.close()
    if feeder.error is not None:
        raise feeder.error
    if writer is None:
        dim = get_backbone(ec.backbone).dim
        writer = PartWriter(ctx.run_dir, ec.rows_per_part, dim, ctx.ensure_held)
    writer.finish(progress.rows_sent, next_part)
    _log_progress(stream, progress, writer)
    return spec, writer


def _pipeline(ctx: RunContext, queue: Any, spec: EmbedderSpec, gpu: bool) -> Any:
    """The Ray dataset: the feeder's blocks -> decode tasks -> the model actor pool. Every
    callable runs under the run's storage settings (``ctx.bind``)."""
    from ray.data import ActorPoolStrategy

    ec = ctx.cfg.embed
    ds = feeder_dataset(queue, ctx.bind)
    ds = ds.map_batches(
        ctx.bind(decode_stage),
        fn_kwargs={
            "size": spec.input_size,
            "resize": spec.resize,
            "max_pixels": ec.max_image_pixels,
        },
        batch_size=ec.decode_batch_size,
        batch_format="numpy",
        num_cpus=ec.decode_num_cpus,
    )
    return ds.map_batches(
        ctx.bind(EmbedActor),
        fn_constructor_kwargs={"spec": spec},
        batch_size=ec.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=ec.num_actors, max_size=ec.max_actors or ec.num_actors),
        num_cpus=ec.actor_num_cpus,
        num_gpus=1 if gpu else 0,
    )


def _open_listing(input_uri: str) -> tuple[InputStream, Iterator[pa.Table]]:
    """The input's stream and its pages, the first one already fetched (errors in the input
    stop here)."""
    stream = InputStream(input_uri, page_size=LIST_PAGE_SIZE)
    pages = stream.pages()
    first_page = next(pages, None)
    if first_page is None:
        raise UserError(
            f"no images found under {input_uri!r} ({stream.skipped} non-image files skipped)"
        )
    return stream, itertools.chain([first_page], pages)


def _validate_weights(ec: EmbedConfig) -> None:
    # Fail on the driver, before any actor starts, when a weights file is simply missing.
    if ec.weights in ("imagenet", "random", "default"):
        return
    if storage.is_remote(ec.weights):
        storage.check_access(ec.weights, must_exist=True)
    elif not storage.exists(ec.weights):
        raise UserError(
            f"embed.weights={ec.weights!r} is not 'imagenet', 'random', 'default' or an existing "
            "file"
        )


def _check_resume_compatible(ctx: RunContext, chosen: dict[str, Any]) -> None:
    """A resume must not add embeddings of another model to those committed."""
    from semclust import runinfo

    before = ctx.previous.get("settings")
    if not isinstance(before, dict):  # recorded before stages kept their settings
        before = runinfo.load(ctx.run_dir).get("config", {}).get("embed") or {}
    if not before:
        return
    changed = [k for k in MODEL_SETTINGS if before.get(k) != chosen[k]]
    if changed and storage.list_shards(storage.join(ctx.run_dir, layout.EMBEDDINGS)):
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {chosen[k]!r}" for k in changed)
        raise UserError(
            f"run directory {ctx.run_dir!r} holds embeddings made with other settings ({detail}); "
            "use --mode overwrite or a new --run-dir"
        )


def _log_progress(stream: InputStream, progress: ListingProgress, writer: PartWriter) -> None:
    log.info(
        "embed: %d images listed%s, %d already committed, %d to do, %d done",
        stream.listed,
        "" if stream.done else " so far",
        progress.already_committed,
        progress.rows_sent,
        writer.rows_written,
    )


def _cpu_counts() -> tuple[float, float]:
    """(CPUs of the largest alive node, CPUs of the whole cluster)."""
    import ray

    alive = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    largest = max((float(res.get("CPU", 0)) for res in alive), default=0.0)
    return largest, float(ray.cluster_resources().get("CPU", 0))
