"""The streamed listing feeding Ray Data: to-do blocks cut from the listing's pages, a driver
thread that lists them, and the one-read-task datasource that takes them from a queue.

Why this shape: the listing's counts and its id set stay on the driver, where the final check
needs them; Ray Data reads a custom datasource whose single read task is a generator that takes
blocks from a small Ray queue (an actor with no CPU claim). Memory is bounded twice: Ray Data
backpressures the read task's generator, which stops taking from the queue, whose ``put`` then
blocks the lister thread; and that thread never lets more than ``rows_ahead`` rows be listed but
not yet back at the writer, whatever Ray Data's own budgets allow.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from semclust import storage
from semclust.embed.sources import isin_sorted

# The blocks the lister hands to Ray Data: a URI, a tar member's byte range, its part number.
BLOCK_SCHEMA = pa.schema(
    [("uri", pa.string()), ("offset", pa.int64()), ("size", pa.int64()), ("part", pa.int64())]
)

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

MAX_BLOCKS_AHEAD = 64  # listed-but-unfinished rows allowed: about this many blocks (rows_ahead)
_QUEUE_BLOCKS = 4  # blocks waiting in the hand-over queue


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
    """Blocks (``BLOCK_SCHEMA``) of the listed images not yet committed.

    ``done_ids`` is sorted (``writer.committed_state``), so the filter is a binary search per
    page. The i-th to-do row goes to part ``next_part + i // rows_per_part``: every part but the
    last is full, which is what lets ``PartWriter`` commit a part without knowing the total.
    Blocks are fresh copies (not slices of a page), so a block shipped to a worker carries only
    itself, and each but the last holds exactly ``block_rows`` rows.
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


def pad_block(block: pa.Table, target_bytes: int = READ_TARGET_BYTES) -> pa.Table:
    """``block`` with a ``_pad`` column whose first value makes the block exceed
    ``target_bytes``, so that Ray Data's output buffer sends it on by itself."""
    n = block.num_rows
    need = max(0, target_bytes + 1 - block.nbytes)  # + the pad's offsets: a little over
    values = [b"\0" * need] + [b""] * (n - 1) if n else []
    return block.append_column(PAD_COLUMN, pa.array(values, pa.binary()))


def rows_ahead(batch_size: int, decode_batch_size: int, block_rows: int) -> int:
    """How many rows may be listed but not yet back at the writer.

    It must exceed what Ray Data can hold back waiting for more input, or the stream stalls:
    a map operator gathers blocks until it has a whole batch (fewer than a batch waits per
    operator), so one block plus the batch sizes of both stages always fits.
    """
    return max(MAX_BLOCKS_AHEAD, 1) * block_rows + batch_size + decode_batch_size


class ListingFeeder:
    """Runs the listing (``blocks``) on a driver thread and hands its blocks to the pipeline's
    read task through a Ray queue, never more than ``max_ahead`` rows ahead of the writer
    (``received_rows``). ``error``: what stopped the listing, reported by the driver after the
    pipeline stops."""

    def __init__(self, blocks: Iterator[pa.Table], max_ahead: int) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=_QUEUE_BLOCKS, actor_options=driver_node_options())
        self.blocks = blocks
        self.max_ahead = max_ahead
        self.sent = 0
        self.received = 0
        self.max_in_flight = 0
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        # The listing reads storage: the thread runs under the settings of the run that made it.
        self._thread = threading.Thread(
            target=storage.carry(self._run), name="semclust-lister", daemon=True
        )

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


def driver_node_options() -> dict[str, Any]:
    """No CPU claim, and on the driver's node when possible: the lister's work is I/O, and the
    driver's node is the one whose loss ends the job anyway."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {
        "num_cpus": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=True),
    }


def drain(queue: Any) -> Iterator[pa.Table]:
    """The read task: the feeder's blocks, padded (``pad_block``), until its end-of-stream."""
    while (block := queue.get(block=True)) is not None:
        yield pad_block(block)


def feeder_dataset(
    queue: Any, bind: Callable[[Any], Any], target_bytes: int = READ_TARGET_BYTES
) -> Any:
    """A Ray dataset with one read task: a generator over the feeder's queue. ``bind``: the run
    context's ``bind``, so that the read task runs under the run's storage settings.

    ``max_retries=0``: a retried generator would skip as many blocks as the lost attempt had
    produced and so lose rows (the writer's check would catch it); failing says so directly.
    """
    import ray
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    read = bind(drain)

    class ListingDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(
            self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
        ) -> list[ReadTask]:
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            schema = BLOCK_SCHEMA.append(pa.field(PAD_COLUMN, pa.binary()))
            return [ReadTask(lambda: read(queue), meta, schema=schema)]

    options = driver_node_options()
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
