"""The embed stage: images -> ``embeddings/part-NNNNN.parquet`` and ``failures/part-NNNNN.parquet``.

The driver lists the input page by page and writes what is not yet committed as numbered to-do
parts (``todo``: at most ``rows_per_part`` URIs each). Ray Data then runs one read task per part
(on any node), decode tasks (CPU: read bytes, decode, resize; ``actors.decode_stage``), the
model actor pool (one model per actor, one model call per ``batch_size`` images;
``actors.EmbedActor``) and write tasks that commit each part where they run
(``writer.PartCommitter``). A part is one block from its read to its commit, so a retried task
rewrites the same shard. The driver receives one commit record per part (counts, no rows: see
``driver_bytes_per_image`` in the record) and holds the listed ids (8 bytes per image) for the
final check, never the listing or an embedding. A resumed run skips every URI already in a
committed part, so nothing is embedded twice or lost. How many actors, threads and decode tasks:
``resources``.

Images whose read still failed for a transient reason after the retry budget are committed
nowhere; the stage then stops with ``writer.ImagesDeferred`` (a ``StoreUnavailable``: a resume
embeds them).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from semclust import storage
from semclust.config import EmbedConfig
from semclust.context import RunContext
from semclust.embed import resources
from semclust.embed.actors import EmbedActor, EmbedderSpec, decode_stage
from semclust.embed.backbones import get_backbone
from semclust.embed.sources import InputStream
from semclust.embed.todo import TodoPart, TodoProgress, todo_dataset, todo_dir, write_todo
from semclust.embed.video import Sampling
from semclust.embed.writer import check_counts, commit_batch, committed_state
from semclust.errors import UserError
from semclust.rundir import layout
from semclust.rundir.frames import read_with_frame_times

log = logging.getLogger(__name__)

LIST_PAGE_SIZE = storage.LIST_PAGE_SIZE  # listing page (S3 keys per request); a config knob later

# What decides the embeddings: a resume into a run made with other values would mix two models.
MODEL_SETTINGS = ("backbone", "weights", "image_size", "resize", "normalize")
# What decides which frames of a video are rows: a resume with others would mix two samplings.
# Checked only against records that have them (runs from before videos were read do not).
SAMPLING_SETTINGS = ("frame_interval", "max_frames_per_video")


_LOG_SECONDS = 10.0  # progress lines at most this often
_WRITE_CPUS = 0.01
_DECODE_WORKER_BYTES = 192 << 20  # a decode worker's own memory: Python, numpy, Pillow, pyarrow


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
    chosen = {key: getattr(ec, key) for key in MODEL_SETTINGS + SAMPLING_SETTINGS}
    if ctx.mode == "resume":
        _check_resume_compatible(ctx, chosen)
    # The listing's first page is taken here, so that an input without images (or one that
    # cannot be read) stops before run_stage changes the run directory; run() goes on with the
    # same stream (for tar shards, the first page costs every tar's name and the first tar's
    # headers).
    stream, pages = _open_listing(ec)
    ctx.state["listing"] = _OpenListing(ctx, stream, pages)
    return chosen


def run(ctx: RunContext) -> dict[str, Any]:
    """Embed every listed image not yet in a committed part; the run.json record (counts,
    listing, throughput and the bytes the driver received per image)."""
    ec = ctx.cfg.embed
    start = time.perf_counter()
    opened = ctx.state.pop("listing", None)
    if opened is not None and opened.ctx is ctx:
        stream, pages = opened.stream, opened.pages
    else:  # run() without settings() on this context
        stream, pages = _open_listing(ec)
    done, next_part = committed_state(ctx.run_dir)
    log.info(
        "embed: %d images already committed in %s; listing %s", len(done), ctx.run_dir, ec.input
    )
    progress = TodoProgress()
    parts = write_todo(ctx.run_dir, pages, done, next_part, ec.rows_per_part, progress)
    if not stream.done:
        raise RuntimeError("the listing did not reach its end")  # a bug, not a user error
    log.info(
        "embed: %d images listed, %d already committed, %d to do in %d parts (%d pages, "
        "%.1f s listing)",
        stream.listed,
        progress.already_committed,
        progress.rows,
        len(parts),
        stream.pages_yielded,
        stream.seconds or 0.0,
    )
    spec = EmbedderSpec.from_config(ec)
    commits = Commits()
    if parts:  # nothing to do: no Ray needed
        spec = _embed(ctx, parts, commits)
    storage.remove_tree(todo_dir(ctx.run_dir))
    seconds = time.perf_counter() - start
    listed_ids = stream.listed_ids()
    counts = check_counts(ctx.run_dir, listed_ids, commits.deferred, commits.deferred_error)
    processed = commits.embedded + commits.failed
    return {
        "listed": len(listed_ids),
        "embedded": counts["embedded"],
        "failed": counts["failed"],
        "skipped_non_image": stream.skipped,
        "duplicate_uris": stream.duplicates,
        "stale_rows": counts["stale"],
        "already_committed": progress.already_committed,
        "processed_this_run": processed,
        "parts_this_run": len(parts),
        "listing_pages": stream.pages_yielded,
        "listing_seconds": round(stream.seconds or 0.0, 3),
        **_video_record(ctx.run_dir, stream),
        "dim": get_backbone(ec.backbone).dim,
        "embedder": asdict(spec),
        "images_per_second": round(processed / seconds, 2) if processed else None,
        "driver_bytes_per_image": (
            round(commits.driver_bytes / progress.rows, 2) if progress.rows else None
        ),
    }


def summary(record: dict[str, Any]) -> str:
    return (
        f"listed {record['listed']}, embedded {record['embedded']}, failed {record['failed']}, "
        f"{record['images_per_second'] or '-'} img/s"
    )


@dataclass
class Commits:
    """What the driver learns from the write tasks: counts per committed part, nothing more."""

    parts: set[int] = field(default_factory=set)
    embedded: int = 0
    failed: int = 0
    deferred: int = 0
    deferred_error: str = ""
    driver_bytes: int = 0  # bytes of commit records received

    def add(self, records: pa.Table) -> None:
        self.driver_bytes += records.nbytes
        for rec in records.to_pylist():
            if rec["part"] in self.parts:  # a re-executed write task: the same files again
                continue
            self.parts.add(rec["part"])
            self.embedded += rec["embedded"]
            self.failed += rec["failed"]
            self.deferred += rec["deferred"]
            self.deferred_error = rec["deferred_error"] or self.deferred_error


def _embed(ctx: RunContext, parts: list[TodoPart], commits: Commits) -> EmbedderSpec:
    """Run the pipeline over the to-do ``parts``; ``commits`` collects the write tasks' records.
    ``ctx.ensure_held`` (the run-directory lock's check) runs at every record, and the write
    tasks check the lock themselves before each commit."""
    from semclust.ray_runtime import one_line_ray_data_errors, use_gpu

    ec = ctx.cfg.embed
    ctx.start_ray()
    one_line_ray_data_errors()
    gpu = use_gpu(ec.device)
    plan = resources.plan(ec, gpu, resources.cluster_shape())
    spec = EmbedderSpec.from_config(ec, threads=plan.threads)
    ds = _pipeline(ctx, parts, spec, gpu, plan)
    last_log = time.monotonic()
    for records in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        commits.add(records)
        ctx.ensure_held()
        if time.monotonic() - last_log > _LOG_SECONDS or len(commits.parts) == len(parts):
            last_log = time.monotonic()
            log.info(
                "embed: %d of %d parts committed (%d embedded, %d failed)",
                len(commits.parts),
                len(parts),
                commits.embedded,
                commits.failed,
            )
    missing = [p.part for p in parts if p.part not in commits.parts]
    if missing:
        raise RuntimeError(
            f"the pipeline lost parts: {len(missing)} of {len(parts)} never committed (first: "
            f"{missing[:10]}). Nothing of those parts was committed; run again with --mode resume"
        )
    return spec


def _pipeline(
    ctx: RunContext,
    parts: list[TodoPart],
    spec: EmbedderSpec,
    gpu: bool,
    plan: resources.EmbedPlan,
) -> Any:
    """The Ray dataset: one read task per to-do part -> decode tasks (CPU) -> the model actor
    pool -> write tasks that commit each part and return its commit record.

    Every operator takes a whole block (``batch_size=None``) and a block is one part, so a part
    stays in one piece from its read to its commit. Every callable runs under the run's storage
    settings (``ctx.bind``)."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    ec = ctx.cfg.embed
    pixel_bytes = ec.rows_per_part * spec.input_size**2 * 3
    # The read tasks and the decode tasks ask for the same resources, so Ray Data fuses them
    # into one task per part (read the part's URIs, read its images, decode) that runs where a
    # decode slot is free, never on a head without CPUs. ``memory``: a part's pixels and bytes;
    # it is also an argument the model actors do not have, which keeps Ray Data from fusing
    # decode into the actor (with equal CPU claims and one decoder per actor it would, and
    # decode and model would then run one after the other).
    decode_resources = {
        "num_cpus": ec.decode_num_cpus,
        "memory": 2 * pixel_bytes + _DECODE_WORKER_BYTES,
        "compute": TaskPoolStrategy(size=plan.decoders),
    }
    ds = todo_dataset(parts, ctx.bind, **decode_resources)
    # A part's pixels must stay one block, not be split at Ray Data's default block target.
    ds.context.target_max_block_size = max(ds.context.target_max_block_size or 0, 2 * pixel_bytes)
    # A task's own error (a full disk, an unreachable store, a lost lock) reaches the driver as
    # itself, not as a UserCodeException whose cause is lost on the way.
    ds.context.raise_original_map_exception = True
    ds = ds.map_batches(
        ctx.bind(decode_stage),
        fn_kwargs={
            "size": spec.input_size,
            "resize": spec.resize,
            "max_pixels": ec.max_image_pixels,
        },
        batch_size=None,
        batch_format="numpy",
        **decode_resources,
    )
    ds = ds.map_batches(
        ctx.bind(EmbedActor),
        fn_constructor_kwargs={"spec": spec},
        batch_size=None,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        num_cpus=ec.actor_num_cpus,
        num_gpus=1 if gpu else 0,
    )
    log.info(
        "embed: %d-%d model actors (%s, %s threads), %d decode tasks at once",
        plan.min_actors,
        plan.max_actors,
        "GPU" if gpu else "CPU",
        spec.threads or "default",
        plan.decoders,
    )
    return ds.map_batches(
        ctx.bind(commit_batch),
        fn_kwargs={
            "run_dir": ctx.run_dir,
            "dim": get_backbone(ec.backbone).dim,
            "lock_token": getattr(ctx.lock, "token", None),
        },
        batch_size=None,
        batch_format="numpy",
        # I/O: a token claim, so that it hardly waits for a core the decoders or the model
        # hold, but still keeps off a head node that has no CPUs (a claim of 0 would not).
        num_cpus=_WRITE_CPUS,
    )


def _video_record(run_dir: str, stream: InputStream) -> dict[str, Any]:
    """run.json's ``videos`` (only when the input had any): videos listed and unreadable, and
    their frame rows listed, embedded and failed, counted from the committed shards, so that
    listed = embedded + failed holds for frames as for rows. Costs one column of each shard."""
    if not stream.videos:
        return {}
    counts = {}
    for folder in (layout.EMBEDDINGS, layout.FAILURES):
        counts[folder] = sum(
            _frame_rows(uri) for uri in storage.list_shards(storage.join(run_dir, folder))
        )
    embedded, failed = counts[layout.EMBEDDINGS], counts[layout.FAILURES]
    return {
        "videos": {
            "listed": stream.videos,
            "unreadable": stream.videos_unreadable,
            "frames_listed": stream.video_frames,
            "frames_embedded": embedded,
            "frames_failed": failed,
        }
    }


def _frame_rows(shard_uri: str) -> int:
    """Rows of a shard that are video frames (0 for a shard from before videos were read)."""
    table = read_with_frame_times(shard_uri, [])
    times = table.column("frame_time").to_numpy(zero_copy_only=False)
    return int((times >= 0).sum())  # nulls (NaN) are still images


def _open_listing(ec: EmbedConfig) -> tuple[InputStream, Iterator[pa.Table]]:
    """The input's stream and its pages, the first one already fetched (errors in the input
    stop here)."""
    input_uri = str(ec.input)
    sampling = Sampling(ec.frame_interval, ec.max_frames_per_video)
    stream = InputStream(input_uri, page_size=LIST_PAGE_SIZE, sampling=sampling)
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
    changed += [k for k in SAMPLING_SETTINGS if k in before and before[k] != chosen[k]]
    if changed and storage.list_shards(storage.join(ctx.run_dir, layout.EMBEDDINGS)):
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {chosen[k]!r}" for k in changed)
        raise UserError(
            f"run directory {ctx.run_dir!r} holds embeddings made with other settings ({detail}); "
            "use --mode overwrite or a new --run-dir"
        )
