"""The embed stage: images -> ``embeddings/part-NNNNN.parquet`` and ``failures/part-NNNNN.parquet``.

Ray Data streams the work: read + decode + resize run as CPU tasks, the backbone runs in an actor
pool (one model per actor, one model call per batch), and the driver commits each part (a fixed,
numbered group of ``rows_per_part`` URIs) atomically once all its rows are back. A resumed run
skips every URI already in a committed part, so nothing is embedded twice or lost.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
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
from semclust.embed.sources import InputStream, ids_for, isin_sorted, read_image_bytes
from semclust.embed.sources import list_images as list_images  # re-exported for callers
from semclust.embed.sources import list_inputs as list_inputs  # re-exported for callers
from semclust.errors import StoreUnavailable
from semclust.retry import is_denied, is_transient, retry_call

log = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"
FAILURES_DIR = "failures"
_READ_THREADS = 8  # object-store reads are latency-bound; overlap them within a batch

LIST_PAGE_SIZE = storage.LIST_PAGE_SIZE  # listing page (S3 keys per request); a config knob later

FAILURES_SCHEMA = pa.schema([("uri", pa.string()), ("stage", pa.string()), ("error", pa.string())])


# The blocks the lister hands to Ray Data: a URI, a tar member's byte range, its part number.
BLOCK_SCHEMA = pa.schema(
    [("uri", pa.string()), ("offset", pa.int64()), ("size", pa.int64()), ("part", pa.int64())]
)


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
    def from_config(
        cls, ec: EmbedConfig, *, gpu: bool = False, cpus: tuple[float, float] | None = None
    ) -> EmbedderSpec:
        """The actors' settings. ``cpus``: (CPUs of the largest node, CPUs of the cluster).

        On CPU, TensorFlow's default of one thread per core in every actor oversubscribes a node
        that runs several actors and the decode tasks; so each actor gets the cluster's cores
        shared out over the pool's largest size, at least its own claim, at most one node.
        """
        spec = get_backbone(ec.backbone)
        threads = ec.threads
        if threads is None and not gpu:
            claim = max(1, math.ceil(ec.actor_num_cpus))
            threads = claim
            if cpus is not None:
                node_cpus, cluster_cpus = cpus
                share = int(cluster_cpus // (ec.max_actors or ec.num_actors))
                threads = max(claim, min(int(node_cpus), share))
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


# ``error_stage`` of a row whose read failed for a transient reason after every retry: it is
# neither embedded nor a failure row, so its part commits without it and the resume reads it again.
DEFERRED = "deferred"


def _read_one(item: tuple[str, int, int]) -> tuple[bytes | None, str, bool]:
    """(bytes or None, error, transient): a read problem is this image's, not the batch's."""
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

    Parts are cut in listing order, so every part but the last receives exactly
    ``rows_per_part`` rows: a part is committed as soon as it has that many, and the last
    (short) one in ``finish``, once the lister has said how many rows it sent. No part's size
    has to be known before the listing ends.

    Rows whose read failed for a transient reason (``DEFERRED``) are left out of both shards,
    so a committed part may hold fewer rows; the resume numbers them into new parts.

    The failures shard is written before the embeddings shard: an embeddings shard is the commit
    marker of its part, so a crash in between leaves an orphan failures shard that resume deletes.
    """

    def __init__(
        self,
        run_dir: str,
        rows_per_part: int,
        dim: int,
        ensure_held: Callable[[], None] = lambda: None,
    ) -> None:
        self.run_dir = run_dir
        self.rows_per_part = rows_per_part
        self.dim = dim
        # Called before each commit: raises if another run has taken the run directory over.
        self.ensure_held = ensure_held
        self.deferred = 0  # rows whose read failed for a transient reason: not committed
        self.deferred_error = ""
        self.buffers: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
        self.counts: dict[int, int] = defaultdict(int)
        self.rows_received = 0
        self.rows_written = 0
        self.failed_written = 0
        self.parts_committed = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        parts = np.asarray(batch["part"])
        self.rows_received += len(parts)
        for part in np.unique(parts):
            p = int(part)
            sel = parts == part
            self.buffers[p].append({k: np.asarray(v)[sel] for k, v in batch.items()})
            self.counts[p] += int(sel.sum())
            if self.counts[p] == self.rows_per_part:
                self._commit(p)
            elif self.counts[p] > self.rows_per_part:
                raise RuntimeError(f"part {p} received more than {self.rows_per_part} rows")

    def finish(self, rows_sent: int, first_part: int) -> None:
        """Commit the last, short part; raise if the rows received differ from those sent.

        ``rows_sent`` rows were numbered from ``first_part`` on, so parts ``first_part ..
        last - 1`` must be full (and already committed) and the last one holds the rest.
        """
        if rows_sent == 0:
            if self.rows_received:
                raise RuntimeError(f"the pipeline returned {self.rows_received} unexpected rows")
            return
        n_parts = -(-rows_sent // self.rows_per_part)
        last = first_part + n_parts - 1
        last_rows = rows_sent - (n_parts - 1) * self.rows_per_part
        pending = dict(self.counts)
        short = {p: c for p, c in pending.items() if not (p == last and c == last_rows)}
        if short or self.rows_received != rows_sent:
            missing = {
                p: (last_rows if p == last else self.rows_per_part) - c for p, c in short.items()
            }
            raise RuntimeError(
                f"the pipeline lost rows: the lister sent {rows_sent} rows, the writer received "
                f"{self.rows_received}; parts never completed (part: rows missing): {missing}. "
                "Nothing of those parts was committed; run again with --mode resume"
            )
        if last in pending:
            self._commit(last)

    def _commit(self, part: int) -> None:
        chunks = self.buffers.pop(part)
        cols = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        errors = cols["error"].astype(object)
        ok = errors == ""
        deferred = cols["error_stage"].astype(object) == DEFERRED
        failed = ~ok & ~deferred
        uris = cols["uri"].astype(object)
        name = f"part-{part:05d}.parquet"
        self.ensure_held()
        if failed.any():
            failures = pa.table(
                {
                    "uri": pa.array(uris[failed].tolist(), pa.string()),
                    "stage": pa.array(
                        cols["error_stage"][failed].astype(object).tolist(), pa.string()
                    ),
                    "error": pa.array(errors[failed].tolist(), pa.string()),
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
        self.rows_written += int(ok.sum() + failed.sum())
        self.failed_written += int(failed.sum())
        self.deferred += int(deferred.sum())
        if deferred.any():
            self.deferred_error = str(errors[deferred][-1])
        self.parts_committed += 1
        del self.counts[part]
        log.info(
            "committed %s: %d embedded, %d failed%s",
            name,
            int(ok.sum()),
            int(failed.sum()),
            f", {int(deferred.sum())} left for the resume (store unreachable)"
            if deferred.any()
            else "",
        )


# --- run-directory bookkeeping ---------------------------------------------------------------


def _part_number(uri: str) -> int:
    return int(uri.rsplit("part-", 1)[1].split(".", 1)[0])


def _shard_ids(run_dir: str) -> tuple[list[np.ndarray], list[np.ndarray], list[str], set[int]]:
    """Image ids of each committed embeddings shard and failures shard (orphans left out)."""
    emb_shards = storage.list_shards(storage.join(run_dir, EMBEDDINGS_DIR))
    committed_parts = {_part_number(u) for u in emb_shards}
    emb_ids = [
        storage.read_parquet(u, ["image_id"])["image_id"].to_numpy().astype(np.int64)
        for u in emb_shards
    ]
    fail_ids: list[np.ndarray] = []
    orphans: list[str] = []
    for uri in storage.list_shards(storage.join(run_dir, FAILURES_DIR)):
        if _part_number(uri) not in committed_parts:
            orphans.append(uri)
            continue
        fail_ids.append(ids_for(storage.read_parquet(uri, ["uri"])["uri"].to_pylist()))
    return emb_ids, fail_ids, orphans, committed_parts


def committed_state(run_dir: str) -> tuple[np.ndarray, int]:
    """(sorted unique ids already committed, next free part number) of a run directory.

    Orphan failures shards (whose part has no embeddings shard) are deleted: their part did not
    commit and its URIs will be processed again.
    """
    emb_ids, fail_ids, orphans, committed_parts = _shard_ids(run_dir)
    for uri in orphans:
        log.warning("removing orphan failures shard %s (its part never committed)", uri)
        storage.remove_tree(uri)
    done = np.unique(np.concatenate([np.empty(0, np.int64), *emb_ids, *fail_ids]))
    return done, max(committed_parts, default=-1) + 1


def count_outputs(run_dir: str, listed_ids: np.ndarray | Iterable[int]) -> dict[str, int]:
    """Counts over committed shards, checking that no image id appears twice.

    ``listed_ids``: the ids of the listing (a numpy array, sorted or not, or any iterable of
    ints); everything is done on int64 arrays, 8 bytes per row.
    """
    if not isinstance(listed_ids, np.ndarray):
        listed_ids = np.fromiter(listed_ids, dtype=np.int64)
    listed = np.unique(np.asarray(listed_ids, dtype=np.int64))
    emb_ids, fail_ids, _, _ = _shard_ids(run_dir)
    emb = np.concatenate([np.empty(0, np.int64), *emb_ids])
    fail = np.concatenate([np.empty(0, np.int64), *fail_ids])
    everything = np.sort(np.concatenate([emb, fail]))
    duplicates = int((everything[1:] == everything[:-1]).sum())
    embedded = int(isin_sorted(emb, listed).sum())
    failed = int(isin_sorted(fail, listed).sum())
    stale = len(emb) + len(fail) - embedded - failed
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


# --- the streamed listing feeding Ray Data ----------------------------------------------------


@dataclass
class ListingProgress:
    """Counts of the to-do stream; they grow while the listing runs."""

    already_committed: int = 0  # listed images skipped because a committed part holds them
    rows_sent: int = 0  # to-do rows numbered into parts


def todo_blocks(
    pages: Iterable[pa.Table],
    done_ids: np.ndarray,
    next_part: int,
    rows_per_part: int,
    block_rows: int,
    progress: ListingProgress | None = None,
) -> Iterator[pa.Table]:
    """Blocks (``uri``, ``offset``, ``size``, ``part``) of the listed images not yet committed.

    ``done_ids`` is sorted (``committed_state``), so the filter is a binary search per page.
    The i-th to-do row goes to part ``next_part + i // rows_per_part``: every part but the last
    is full, which is what lets ``PartWriter`` commit a part without knowing the total. Blocks
    are fresh copies (not slices of a page), so a block shipped to a worker carries only itself,
    and each but the last holds exactly ``block_rows`` rows.
    """
    progress = progress if progress is not None else ListingProgress()
    buf: list[pa.Table] = []
    buffered = 0

    def number(table: pa.Table) -> pa.Table:
        n = table.num_rows
        block = table.select(["uri", "offset", "size"]).take(pa.array(np.arange(n)))
        parts = next_part + (progress.rows_sent + np.arange(n, dtype=np.int64)) // rows_per_part
        progress.rows_sent += n
        return block.append_column("part", pa.array(parts, pa.int64()))

    for page in pages:
        keep = ~isin_sorted(page.column("image_id").to_numpy(), done_ids)
        progress.already_committed += int(len(keep) - keep.sum())
        if not keep.all():
            page = page.filter(pa.array(keep))
        if page.num_rows == 0:
            continue
        buf.append(page)
        buffered += page.num_rows
        while buffered >= block_rows:
            table = pa.concat_tables(buf)
            yield number(table.slice(0, block_rows))
            rest = table.slice(block_rows)
            buf, buffered = ([rest] if rest.num_rows else []), rest.num_rows
    if buffered:
        yield number(pa.concat_tables(buf))


# Ray Data buffers a task's output until it exceeds the dataset's target block size (128 MB by
# default) or the task ends, and the listing's one read task never ends. Lowering the target to
# the size of a URI block (a few KB) makes every block leave at once, but the target is
# dataset-wide: the actors' outputs were then cut into one-row blocks, which made the pipeline
# 4-5x slower (measured: 14 vs 69 img/s marginal, efficientnet_lite0, 2 CPUs). So the target is
# a moderate 1 MiB, which keeps an actor's output batch in one block, and each URI block carries
# a padding value that lifts it just over the target (about 4 KB per image in 256-row blocks;
# the decode stage drops it).
READ_TARGET_BYTES = 1 << 20
PAD_COLUMN = "_pad"


def pad_block(block: pa.Table, target_bytes: int = READ_TARGET_BYTES) -> pa.Table:
    """``block`` with a ``_pad`` column whose first value makes the block exceed
    ``target_bytes``, so that Ray Data's output buffer sends it on by itself."""
    n = block.num_rows
    need = max(0, target_bytes + 1 - block.nbytes)  # + the pad's offsets: a little over
    values = [b"\0" * need] + [b""] * (n - 1) if n else []
    return block.append_column(PAD_COLUMN, pa.array(values, pa.binary()))


MAX_BLOCKS_AHEAD = 64  # listed-but-unfinished rows allowed: about this many blocks (_rows_ahead)
_QUEUE_BLOCKS = 4  # blocks waiting in the hand-over queue


class _Feeder:
    """Runs the listing on a driver thread and hands its blocks to the pipeline's read task.

    Why this shape: the listing's counts and its id set stay on the driver, where the final check
    needs them; Ray Data reads a custom datasource whose single read task is a generator that
    takes blocks from a small Ray queue (an actor with no CPU claim). Memory is bounded twice:
    Ray Data backpressures the read task's generator, which stops taking from the queue, whose
    ``put`` then blocks this thread; and this thread never lets more than ``max_ahead`` rows be
    listed but not yet back at the writer, whatever Ray Data's own budgets allow.
    """

    def __init__(self, blocks: Iterator[pa.Table], max_ahead: int) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=_QUEUE_BLOCKS, actor_options=_driver_node_options())
        self.blocks = blocks
        self.max_ahead = max_ahead
        self.sent = 0
        self.received = 0
        self.max_in_flight = 0
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="semclust-lister", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            for block in self.blocks:
                n = block.num_rows
                with self._cond:  # counts rows in flight before this block, so any block fits
                    while self.sent - self.received > self.max_ahead and not self._stop.is_set():
                        self._cond.wait(timeout=1.0)
                if not self._put(block):
                    return
                with self._cond:
                    self.sent += n
                    self.max_in_flight = max(self.max_in_flight, self.sent - self.received)
        except BaseException as exc:  # reported by the driver after the pipeline stops
            self.error = exc
        self._put(None)  # end of the stream: the read task returns

    def _put(self, item: pa.Table | None) -> bool:
        from ray.util.queue import Full

        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=1.0)
                return True
            except Full:
                continue
        return False

    def received_rows(self, n: int) -> None:
        with self._cond:
            self.received += n
            self._cond.notify_all()

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=60)
        self.queue.shutdown(force=True)


def _rows_ahead(ec: EmbedConfig, block_rows: int) -> int:
    """How many rows may be listed but not yet back at the writer.

    It must exceed what Ray Data can hold back waiting for more input, or the stream stalls:
    a map operator gathers blocks until it has a whole batch (fewer than ``batch_size`` rows
    wait per operator), so one block plus the batch sizes of both stages always fits.
    """
    held_back = ec.batch_size + ec.decode_batch_size
    return max(MAX_BLOCKS_AHEAD, 1) * block_rows + held_back


def _cpu_counts() -> tuple[float, float]:
    """(CPUs of the largest node, CPUs of the whole cluster)."""
    import ray

    from semclust.clustering.faiss_ops import node_resources

    return node_resources()[0], float(ray.cluster_resources().get("CPU", 0))


def _driver_node_options() -> dict[str, Any]:
    """No CPU claim, and on the driver's node when possible: the lister's work is I/O, and the
    driver's node is the one whose loss ends the job anyway."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {
        "num_cpus": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=True),
    }


def _drain(queue: Any) -> Iterator[pa.Table]:
    while (block := queue.get(block=True)) is not None:
        yield pad_block(block)


def _feeder_dataset(queue: Any, target_bytes: int) -> Any:
    """A Ray dataset with one read task: a generator over the feeder's queue.

    ``max_retries=0``: a retried generator would skip as many blocks as the lost attempt had
    produced and so lose rows (the writer's check would catch it); failing says so directly.
    """
    import ray
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class ListingDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(
            self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
        ) -> list[ReadTask]:
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            schema = BLOCK_SCHEMA.append(pa.field(PAD_COLUMN, pa.binary()))
            return [ReadTask(lambda: _drain(queue), meta, schema=schema)]

    options = _driver_node_options()
    with warnings.catch_warnings():
        # Ray 2.60 deprecates ray_remote_args for reads, but has no named max_retries or soft
        # node affinity yet.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ray.data.read_datasource(
            ListingDatasource(),
            num_cpus=0,
            # One output block per block listed: without it Ray Data splits each block into as
            # many pieces as the parallelism it wanted from the single read task.
            override_num_blocks=1,
            ray_remote_args={
                "max_retries": 0,
                "scheduling_strategy": options["scheduling_strategy"],
            },
        )
    ds.context.target_max_block_size = target_bytes  # this dataset's own copy
    return ds


def run_embed(cfg: RunConfig, *, ensure_held: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the embed stage; returns the record written to run.json under ``stages.embed``.

    The listing is streamed: pages of URIs flow, minus those already committed, into Ray Data
    while the listing goes on, so the first parts commit before the last page is listed. The
    driver holds the listed ids (8 bytes per image) and a bounded window of rows, never the
    listing itself. ``ensure_held`` (the run-directory lock's check) runs before every commit.

    Images whose read still failed for a transient reason after the retry budget are committed
    nowhere; the stage then records ``failed`` and raises ``StoreUnavailable`` (a resume embeds
    them).
    """
    held = ensure_held or (lambda: None)
    from ray.data import ActorPoolStrategy

    from semclust.ray_runtime import ensure_ray, use_gpu

    ec = cfg.embed
    run_dir = _require_run_dir(cfg)
    if not ec.input:
        raise ValueError("the embed stage needs an input: pass a folder, file:// or s3:// URI")
    _validate_weights(ec)
    storage.check_access(run_dir, must_exist=False)
    start = time.perf_counter()
    stream = InputStream(ec.input, page_size=LIST_PAGE_SIZE)
    pages = stream.pages()
    first_page = next(pages, None)  # errors in the input stop here, before the run dir changes
    if first_page is None:
        raise ValueError(
            f"no images found under {ec.input!r} ({stream.skipped} non-image files skipped)"
        )
    prepare_run_dir(run_dir, cfg.mode, "embed")
    _check_resume_compatible(run_dir, ec)
    # Record the settings now, so that a resume after a crash is checked against them.
    runinfo.update_stage(run_dir, "embed", {"status": "running"}, cfg.to_dict())
    done, next_part = committed_state(run_dir)
    log.info("embed: %d images already committed in %s; listing %s", len(done), run_dir, ec.input)
    progress = ListingProgress()
    block_rows = ec.decode_batch_size * 4
    blocks = todo_blocks(
        itertools.chain([first_page], pages),
        done,
        next_part,
        ec.rows_per_part,
        block_rows,
        progress,
    )
    first_block = next(blocks, None)  # nothing to do: no Ray needed
    spec = EmbedderSpec.from_config(ec)
    dim = get_backbone(ec.backbone).dim
    processed = deferred = 0
    deferred_error = ""
    if first_block is not None:
        ensure_ray(cfg.ray)
        gpu = use_gpu(ec.device)
        spec = EmbedderSpec.from_config(ec, gpu=gpu, cpus=_cpu_counts())
        feeder = _Feeder(itertools.chain([first_block], blocks), _rows_ahead(ec, block_rows))
        try:
            feeder.start()
            ds = _feeder_dataset(feeder.queue, READ_TARGET_BYTES)
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
            writer: PartWriter | None = None
            logged_parts = 0
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if writer is None:
                    dim = int(np.asarray(batch["embedding"]).shape[1])
                    writer = PartWriter(run_dir, ec.rows_per_part, dim, held)
                writer.add(batch)
                feeder.received_rows(len(batch["part"]))
                if writer.parts_committed != logged_parts:
                    logged_parts = writer.parts_committed
                    _log_progress(stream, progress, writer)
        finally:
            feeder.close()
        if feeder.error is not None:
            raise feeder.error
        writer = writer or PartWriter(run_dir, ec.rows_per_part, dim, held)
        writer.finish(progress.rows_sent, next_part)
        _log_progress(stream, progress, writer)
        processed = writer.rows_written
        deferred, deferred_error = writer.deferred, writer.deferred_error
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
    counts = count_outputs(run_dir, listed_ids)
    listed = len(listed_ids)
    if counts["duplicates"]:
        raise RuntimeError(f"{counts['duplicates']} image ids appear twice in {run_dir}")
    if deferred and counts["embedded"] + counts["failed"] + deferred == listed:
        runinfo.update_stage(
            run_dir,
            "embed",
            {
                "status": "failed",
                "listed": listed,
                "embedded": counts["embedded"],
                "failed": counts["failed"],
                "deferred": deferred,
                "error": deferred_error[:2000],
            },
            cfg.to_dict(),
        )
        raise StoreUnavailable(
            f"{deferred} of {listed} images could not be read: the store was unreachable for "
            f"longer than storage.retry_seconds={storage.retry_policy().seconds:g} s (last error: "
            f"{deferred_error[:300]}). They are not failures: {counts['embedded']} embedded and "
            f"{counts['failed']} failed images are committed, and `--mode resume` embeds the rest"
        )
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
        "skipped_non_image": stream.skipped,
        "duplicate_uris": stream.duplicates,
        "stale_rows": counts["stale"],
        "already_committed": progress.already_committed,
        "processed_this_run": processed,
        "listing_pages": stream.pages_yielded,
        "listing_seconds": round(stream.seconds or 0.0, 3),
        "dim": dim,
        "embedder": asdict(spec),
        "seconds": round(seconds, 3),
        "images_per_second": round(processed / seconds, 2) if processed else None,
    }
    runinfo.update_stage(run_dir, "embed", record, cfg.to_dict())
    return record


def _log_progress(stream: InputStream, progress: ListingProgress, writer: PartWriter) -> None:
    log.info(
        "embed: %d images listed%s, %d already committed, %d to do, %d done",
        stream.listed,
        "" if stream.done else " so far",
        progress.already_committed,
        progress.rows_sent,
        writer.rows_written,
    )


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
