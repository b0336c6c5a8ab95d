"""The embed stage: images -> ``embeddings/part-NNNNN.parquet`` and ``failures/part-NNNNN.parquet``.

Ray Data streams the work: read + decode + resize run as CPU tasks, the backbone runs in an actor
pool (one model per actor, one model call per batch), and the driver commits each part (a fixed,
numbered group of ``rows_per_part`` URIs) atomically once all its rows are back. A resumed run
skips every URI already in a committed part, so nothing is embedded twice or lost.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semclust import runinfo, storage
from semclust.config import EmbedConfig, RunConfig
from semclust.embed.backbones import get_backbone
from semclust.embed.decode import decode_batch
from semclust.embed.sources import list_images as list_images  # re-exported for callers
from semclust.embed.sources import list_inputs, read_image_bytes

log = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"
FAILURES_DIR = "failures"
_READ_THREADS = 8  # object-store reads are latency-bound; overlap them within a batch

FAILURES_SCHEMA = pa.schema([("uri", pa.string()), ("stage", pa.string()), ("error", pa.string())])


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.int64()),
            ("uri", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
            ("width", pa.int32()),
            ("height", pa.int32()),
        ]
    )


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
    def from_config(cls, ec: EmbedConfig, *, gpu: bool = False) -> EmbedderSpec:
        """The actors' settings; on CPU, TensorFlow gets as many threads as the actor claims CPUs
        (its default of one per core would compete with the decode tasks on the same node)."""
        spec = get_backbone(ec.backbone)
        threads = ec.threads
        if threads is None and not gpu:
            threads = max(1, math.ceil(ec.actor_num_cpus))
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


def _read_one(item: tuple[str, int, int]) -> tuple[bytes | None, str]:
    try:
        return read_image_bytes(*item), ""
    except Exception as exc:  # any read problem is this image's failure row, not the batch's
        return None, f"read failed: {type(exc).__name__}: {storage.redact(str(exc))}"


def decode_stage(
    batch: dict[str, np.ndarray],
    size: int,
    resize: str,
    max_pixels: int,
    s3: storage.S3Options | None = None,
) -> dict[str, np.ndarray]:
    """Ray Data CPU task: read bytes and decode a batch of URIs into fixed-size uint8 pixels."""
    if s3 is not None and s3 != storage.s3_options():
        storage.configure_s3(s3)
    uris = [str(u) for u in batch["uri"]]
    items = list(zip(uris, batch["offset"].tolist(), batch["size"].tolist(), strict=True))
    with ThreadPoolExecutor(min(_READ_THREADS, max(1, len(uris)))) as pool:
        reads = list(pool.map(_read_one, items))
    blobs = [b for b, _ in reads]
    pixels, widths, heights, decode_errors = decode_batch(blobs, size, resize, max_pixels)
    errors = np.empty(len(uris), dtype=object)
    stages = np.empty(len(uris), dtype=object)
    for i, ((_, read_error), decode_error) in enumerate(zip(reads, decode_errors, strict=True)):
        if read_error:
            errors[i], stages[i] = read_error, "read"
        elif decode_error:
            errors[i], stages[i] = decode_error, "decode"
        else:
            errors[i], stages[i] = "", ""
    return {
        "uri": np.asarray(uris, dtype=object),
        "part": np.asarray(batch["part"], dtype=np.int64),
        "pixels": pixels,
        "width": widths,
        "height": heights,
        "error": errors,
        "error_stage": stages,
    }


class EmbedActor:
    """Ray Data actor: builds the backbone once, then one model call per batch."""

    def __init__(self, spec: EmbedderSpec, s3: storage.S3Options | None = None) -> None:
        if s3 is not None:  # weights may live in object storage
            storage.configure_s3(s3)
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
        return {
            "uri": batch["uri"],
            "part": batch["part"],
            "embedding": emb,
            "width": batch["width"],
            "height": batch["height"],
            "error": errors,
            "error_stage": stages,
        }


class PartWriter:
    """Collects rows per part on the driver and commits each part when all its rows are in.

    The failures shard is written before the embeddings shard: an embeddings shard is the commit
    marker of its part, so a crash in between leaves an orphan failures shard that resume deletes.
    """

    def __init__(self, run_dir: str, expected_rows: dict[int, int], dim: int) -> None:
        self.run_dir = run_dir
        self.expected = dict(expected_rows)
        self.dim = dim
        self.buffers: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
        self.counts: dict[int, int] = defaultdict(int)
        self.rows_written = 0
        self.failed_written = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        parts = np.asarray(batch["part"])
        for part in np.unique(parts):
            sel = parts == part
            self.buffers[int(part)].append({k: np.asarray(v)[sel] for k, v in batch.items()})
            self.counts[int(part)] += int(sel.sum())
            if self.counts[int(part)] == self.expected[int(part)]:
                self._commit(int(part))
            elif self.counts[int(part)] > self.expected[int(part)]:
                raise RuntimeError(f"part {part} received more rows than it holds")

    def _commit(self, part: int) -> None:
        chunks = self.buffers.pop(part)
        cols = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        errors = cols["error"].astype(object)
        ok = errors == ""
        uris = cols["uri"].astype(object)
        name = f"part-{part:05d}.parquet"
        if (~ok).any():
            failures = pa.table(
                {
                    "uri": pa.array(uris[~ok].tolist(), pa.string()),
                    "stage": pa.array(
                        cols["error_stage"][~ok].astype(object).tolist(), pa.string()
                    ),
                    "error": pa.array(errors[~ok].tolist(), pa.string()),
                },
                schema=FAILURES_SCHEMA,
            )
            storage.write_parquet(storage.join(self.run_dir, FAILURES_DIR, name), failures)
        emb = np.ascontiguousarray(cols["embedding"][ok], dtype=np.float32).reshape(-1, self.dim)
        ok_uris = uris[ok].tolist()
        table = pa.table(
            {
                "image_id": pa.array([storage.image_id_for(u) for u in ok_uris], pa.int64()),
                "uri": pa.array(ok_uris, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), self.dim),
                "width": pa.array(cols["width"][ok].astype(np.int32)),
                "height": pa.array(cols["height"][ok].astype(np.int32)),
            },
            schema=embeddings_schema(self.dim),
        )
        storage.write_parquet(storage.join(self.run_dir, EMBEDDINGS_DIR, name), table)
        self.rows_written += len(uris)
        self.failed_written += int((~ok).sum())
        del self.counts[part]
        log.info("committed %s: %d embedded, %d failed", name, int(ok.sum()), int((~ok).sum()))

    def check_complete(self) -> None:
        missing = {p: self.expected[p] - c for p, c in self.counts.items()}
        uncommitted = [p for p in self.expected if p in self.counts or p in self.buffers]
        if uncommitted:
            raise RuntimeError(f"the pipeline lost rows: parts {missing} never completed")


# --- run-directory bookkeeping ---------------------------------------------------------------


def _part_number(uri: str) -> int:
    return int(uri.rsplit("part-", 1)[1].split(".", 1)[0])


def committed_state(run_dir: str) -> tuple[set[int], int]:
    """(image ids already committed, next free part number) of a run directory.

    Orphan failures shards (whose part has no embeddings shard) are deleted: their part did not
    commit and its URIs will be processed again.
    """
    emb_shards = storage.list_shards(storage.join(run_dir, EMBEDDINGS_DIR))
    fail_shards = storage.list_shards(storage.join(run_dir, FAILURES_DIR))
    committed_parts = {_part_number(u) for u in emb_shards}
    done: set[int] = set()
    for uri in emb_shards:
        done.update(storage.read_parquet(uri, columns=["image_id"])["image_id"].to_pylist())
    for uri in fail_shards:
        if _part_number(uri) not in committed_parts:
            log.warning("removing orphan failures shard %s (its part never committed)", uri)
            storage.remove_tree(uri)
            continue
        uris = storage.read_parquet(uri, ["uri"])["uri"].to_pylist()
        done.update(storage.image_id_for(u) for u in uris)
    return done, max(committed_parts, default=-1) + 1


def count_outputs(run_dir: str, listed_ids: set[int]) -> dict[str, int]:
    """Counts over committed shards, checking that no image id appears twice."""
    seen: set[int] = set()
    embedded = failed = duplicates = stale = 0
    for uri in storage.list_shards(storage.join(run_dir, EMBEDDINGS_DIR)):
        for image_id in storage.read_parquet(uri, ["image_id"])["image_id"].to_pylist():
            duplicates += image_id in seen
            seen.add(image_id)
            if image_id in listed_ids:
                embedded += 1
            else:
                stale += 1
    for uri in storage.list_shards(storage.join(run_dir, FAILURES_DIR)):
        for u in storage.read_parquet(uri, ["uri"])["uri"].to_pylist():
            image_id = storage.image_id_for(u)
            duplicates += image_id in seen
            seen.add(image_id)
            if image_id in listed_ids:
                failed += 1
            else:
                stale += 1
    return {"embedded": embedded, "failed": failed, "duplicates": duplicates, "stale": stale}


def _check_resume_compatible(run_dir: str, ec: EmbedConfig) -> None:
    previous = runinfo.load(run_dir).get("config", {}).get("embed")
    if not previous:
        return
    keys = ("backbone", "weights", "image_size", "resize", "normalize")
    changed = [k for k in keys if previous.get(k) != getattr(ec, k)]
    if changed and storage.list_shards(storage.join(run_dir, EMBEDDINGS_DIR)):
        detail = ", ".join(f"{k}: {previous.get(k)!r} -> {getattr(ec, k)!r}" for k in changed)
        raise ValueError(
            f"run directory {run_dir!r} holds embeddings made with other settings ({detail}); "
            "use --mode overwrite or a new --run-dir"
        )


def prepare_run_dir(run_dir: str, mode: str, first_stage: str) -> None:
    """``overwrite`` clears this stage's outputs and those of the stages that read them."""
    storage.makedirs(run_dir)
    if mode != "overwrite":
        return
    for stage in runinfo.stage_and_dependents(first_stage):
        for folder in runinfo.STAGE_OUTPUTS[stage]:
            storage.remove_tree(storage.join(run_dir, folder))


def _validate_weights(ec: EmbedConfig) -> None:
    # Fail on the driver, before any actor starts, when a weights file is simply missing.
    if ec.weights in ("imagenet", "random", "default"):
        return
    if storage.is_remote(ec.weights):
        storage.check_access(ec.weights, must_exist=True)
    elif not storage.exists(ec.weights):
        raise ValueError(
            f"embed.weights={ec.weights!r} is not 'imagenet', 'random', 'default' or an existing "
            "file"
        )


def run_embed(cfg: RunConfig) -> dict[str, Any]:
    """Run the embed stage; returns the record written to run.json under ``stages.embed``."""
    import ray
    from ray.data import ActorPoolStrategy

    from semclust.ray_runtime import ensure_ray, use_gpu

    ec = cfg.embed
    run_dir = _require_run_dir(cfg)
    if not ec.input:
        raise ValueError("the embed stage needs an input: pass a folder, file:// or s3:// URI")
    _validate_weights(ec)
    storage.check_access(run_dir, must_exist=False)
    start = time.perf_counter()
    listing = list_inputs(ec.input)
    if not listing.uris:
        raise ValueError(
            f"no images found under {ec.input!r} ({listing.skipped} non-image files skipped)"
        )
    prepare_run_dir(run_dir, cfg.mode, "embed")
    _check_resume_compatible(run_dir, ec)
    # Record the settings now, so that a resume after a crash is checked against them.
    runinfo.update_stage(run_dir, "embed", {"status": "running"}, cfg.to_dict())
    done, next_part = committed_state(run_dir)
    listed_ids = {storage.image_id_for(u) for u in listing.uris}
    todo = [i for i, u in enumerate(listing.uris) if storage.image_id_for(u) not in done]
    log.info(
        "embed: %d images listed, %d already committed, %d to do",
        len(listing.uris),
        len(listing.uris) - len(todo),
        len(todo),
    )
    spec = EmbedderSpec.from_config(ec)
    dim = get_backbone(ec.backbone).dim
    processed = 0
    if todo:
        ensure_ray(cfg.ray)
        gpu = use_gpu(ec.device)
        spec = EmbedderSpec.from_config(ec, gpu=gpu)
        parts = np.arange(len(todo)) // ec.rows_per_part + next_part
        expected = {
            int(p): int(c) for p, c in zip(*np.unique(parts, return_counts=True), strict=True)
        }
        table = listing.table().take(pa.array(todo, pa.int64()))
        table = table.append_column("part", pa.array(parts))
        block_rows = ec.decode_batch_size * 4
        blocks = [table.slice(i, block_rows) for i in range(0, table.num_rows, block_rows)]
        ds = ray.data.from_arrow(blocks)
        ds = ds.map_batches(
            decode_stage,
            fn_kwargs={
                "size": spec.input_size,
                "resize": spec.resize,
                "max_pixels": ec.max_image_pixels,
                "s3": storage.s3_options(),
            },
            batch_size=ec.decode_batch_size,
            batch_format="numpy",
            num_cpus=ec.decode_num_cpus,
        )
        ds = ds.map_batches(
            EmbedActor,
            fn_constructor_kwargs={"spec": spec, "s3": storage.s3_options()},
            batch_size=ec.batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(
                min_size=ec.num_actors, max_size=ec.max_actors or ec.num_actors
            ),
            num_cpus=ec.actor_num_cpus,
            num_gpus=1 if gpu else 0,
        )
        writer = None
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if writer is None:
                dim = int(np.asarray(batch["embedding"]).shape[1])
                writer = PartWriter(run_dir, expected, dim)
            writer.add(batch)
        if writer is None:
            raise RuntimeError("the embedding pipeline returned no rows")
        writer.check_complete()
        processed = writer.rows_written
    seconds = time.perf_counter() - start
    counts = count_outputs(run_dir, listed_ids)
    listed = len(listing.uris)
    if counts["duplicates"]:
        raise RuntimeError(f"{counts['duplicates']} image ids appear twice in {run_dir}")
    if counts["embedded"] + counts["failed"] != listed:
        raise RuntimeError(
            f"listed={listed} but embedded={counts['embedded']} + failed={counts['failed']}; "
            "run again with --mode resume to finish the missing images"
        )
    record = {
        "status": "done",
        "listed": listed,
        "embedded": counts["embedded"],
        "failed": counts["failed"],
        "skipped_non_image": listing.skipped,
        "duplicate_uris": listing.duplicates,
        "stale_rows": counts["stale"],
        "processed_this_run": processed,
        "dim": dim,
        "embedder": asdict(spec),
        "seconds": round(seconds, 3),
        "images_per_second": round(processed / seconds, 2) if processed else None,
    }
    runinfo.update_stage(run_dir, "embed", record, cfg.to_dict())
    return record


def _require_run_dir(cfg: RunConfig) -> str:
    if not cfg.run_dir:
        raise ValueError("no run directory given: pass --run-dir (a local path or s3:// prefix)")
    return cfg.run_dir


def read_embeddings(shard_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(image_id int64 (n,), embedding float32 (n, D)) of one embeddings shard."""
    table = storage.read_parquet(shard_uri, columns=["image_id", "embedding"])
    ids = table.column("image_id").to_numpy()
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    values = pc.list_flatten(col).to_numpy(zero_copy_only=False)
    return ids, np.asarray(values, dtype=np.float32).reshape(-1, dim)
