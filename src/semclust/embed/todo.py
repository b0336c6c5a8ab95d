"""The embed stage's to-do list: what is listed but not yet committed, cut into numbered parts
and written to the run directory (``embed-todo/part-NNNNN.parquet``), and the Ray Data
datasource with one read task per part.

Why a list in storage rather than a stream from the driver: Ray Data plans its read tasks up
front, so a datasource whose read tasks each take one part can be scheduled in parallel on any
node, retried on its own, and re-executed after a node is lost, and the driver holds only the
parts' names and sizes (a few dozen bytes per part), never the listing. The listing is streamed
page by page into those parts (one part in memory at a time), so its cost on the driver does not
grow with the input.

The i-th to-do row goes to part ``next_part + i // rows_per_part``, in listing order; a part is
the pipeline's unit from here on (one read task, one decode task, one model call sequence, one
commit), which is what makes a retried task rewrite the same shard instead of adding rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from semclust import storage
from semclust.embed.sources import isin_sorted
from semclust.rundir import layout

# A part of the to-do list: the URI, a tar member's byte range, a video frame's time and number
# (NaN and -1 for a still image: ``sources.PAGE_SCHEMA``), its part number.
TODO_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("frame_time", pa.float32()),
        ("frame_index", pa.int32()),
        ("part", pa.int64()),
    ]
)

_WRITERS = 8  # to-do parts written at once: object-store writes are latency-bound


@dataclass(frozen=True)
class TodoPart:
    """One part of the to-do list, as the driver keeps it."""

    part: int
    rows: int
    uri: str  # its file in embed-todo/


@dataclass
class TodoProgress:
    """Counts of the to-do list; they grow while the listing runs."""

    already_committed: int = 0  # listed images skipped because a committed part holds them
    rows: int = 0  # to-do rows numbered into parts


def todo_dir(run_dir: str) -> str:
    return storage.join(run_dir, layout.EMBED_TODO)


def cut_parts(
    pages: Iterable[pa.Table],
    done_ids: np.ndarray,
    next_part: int,
    rows_per_part: int,
    progress: TodoProgress,
) -> Iterator[pa.Table]:
    """The to-do rows of ``pages`` (those not in the sorted ``done_ids``) in parts of
    ``rows_per_part`` rows (the last one shorter), each a fresh ``TODO_SCHEMA`` table."""
    buf: list[pa.Table] = []
    buffered = 0
    part = next_part

    def numbered(table: pa.Table) -> pa.Table:
        block = table.select(TODO_SCHEMA.names[:-1]).combine_chunks()
        column = pa.array(np.full(block.num_rows, part, dtype=np.int64))
        return block.append_column("part", column)

    for page in pages:
        keep = ~isin_sorted(page.column("image_id").to_numpy(), done_ids)
        progress.already_committed += int(len(keep) - keep.sum())
        if not keep.all():
            page = page.filter(pa.array(keep))
        if page.num_rows == 0:
            continue
        buf.append(page)
        buffered += page.num_rows
        progress.rows += page.num_rows
        while buffered >= rows_per_part:
            table = pa.concat_tables(buf)
            yield numbered(table.slice(0, rows_per_part))
            part += 1
            rest = table.slice(rows_per_part)
            buf, buffered = ([rest] if rest.num_rows else []), rest.num_rows
    if buffered:
        yield numbered(pa.concat_tables(buf))


def write_todo(
    run_dir: str,
    pages: Iterable[pa.Table],
    done_ids: np.ndarray,
    next_part: int,
    rows_per_part: int,
    progress: TodoProgress,
) -> list[TodoPart]:
    """Write the to-do parts to ``embed-todo/`` (emptied first); the parts, in order.

    At most ``_WRITERS`` parts are held in memory while they are written."""
    folder = todo_dir(run_dir)
    storage.remove_tree(folder)
    parts: list[TodoPart] = []
    pending: list[Future[None]] = []
    write = storage.carry(storage.write_parquet)
    with ThreadPoolExecutor(_WRITERS, thread_name_prefix="semclust-todo") as pool:
        for table in cut_parts(pages, done_ids, next_part, rows_per_part, progress):
            number = int(table.column("part")[0].as_py())
            uri = storage.join(folder, f"part-{number:05d}.parquet")
            pending.append(pool.submit(write, uri, table))
            parts.append(TodoPart(number, table.num_rows, uri))
            if len(pending) >= _WRITERS:
                pending.pop(0).result()
        for future in pending:
            future.result()
    return parts


def read_part(uri: str) -> pa.Table:
    """A to-do part's rows (``TODO_SCHEMA``) with ``part_rows``: its row count on every row, so
    the writer can tell a whole part from a piece of one."""
    table = storage.read_parquet(uri).select(TODO_SCHEMA.names).cast(TODO_SCHEMA)
    rows = pa.array(np.full(table.num_rows, table.num_rows, dtype=np.int64))
    return table.append_column("part_rows", rows)


def todo_dataset(parts: list[TodoPart], bind: Callable[[Any], Any], **resources: Any) -> Any:
    """A Ray dataset with one read task (and so one block) per to-do part. ``bind``: the run
    context's ``bind``, so that every read runs under the run's storage settings;
    ``resources``: the read tasks' ``num_cpus``, ``memory``, ``compute``."""
    import ray
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    read = bind(read_part)
    schema = TODO_SCHEMA.append(pa.field("part_rows", pa.int64()))

    def task(part: TodoPart) -> ReadTask:
        meta = BlockMetadata(
            num_rows=part.rows, size_bytes=part.rows * 128, input_files=None, exec_stats=None
        )
        return ReadTask(lambda: [read(part.uri)], meta, schema=schema)

    class TodoDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return sum(p.rows for p in parts) * 128

        def get_read_tasks(
            self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
        ) -> list[ReadTask]:
            return [task(p) for p in parts]  # one per part, whatever parallelism is asked

    return ray.data.read_datasource(TodoDatasource(), override_num_blocks=len(parts), **resources)
