"""Rows that are video frames: their ids, and how a frame is named to a person.

A still image's id is ``image_id_for(uri)``. A frame sampled from a video keeps the video's URI
in ``uri`` and its time (seconds from the video's start, float32) in ``frame_time``; its id is
``image_id_for(f"{uri}\\x00frame@{ms}ms")`` with the time in whole milliseconds, so it is stable
across runs and machines and never equal to a still image's (no URI holds a NUL). ``frame_time``
is null for still images and for a video that could not be read at all (its one failure row).

In the pipeline (listing pages, to-do parts) the column is a plain float32 with NaN for a still
image and ``UNREADABLE_VIDEO`` for a video whose probe failed; the run directory's tables hold
nulls instead (``as_nullable``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from semclust.storage import image_id_for

UNREADABLE_VIDEO = -1.0  # frame_time of the one row of a video whose probe failed


def frame_ms(seconds: float) -> int:
    """A frame time in whole milliseconds, from its float32 value (what the tables keep)."""
    return round(float(np.float32(seconds)) * 1000.0)


def frame_id(uri: str, seconds: float) -> int:
    """The image id of the frame of ``uri`` at ``seconds``."""
    return image_id_for(f"{uri}\x00frame@{frame_ms(seconds)}ms")


def row_id(uri: str, frame_time: float | None) -> int:
    """The id of a row: a frame's when ``frame_time`` is a time (>= 0), else the URI's."""
    if frame_time is None or not frame_time >= 0:  # None, NaN, UNREADABLE_VIDEO
        return image_id_for(uri)
    return frame_id(uri, frame_time)


def row_ids(uris: Sequence[str], frame_times: Sequence[float | None] | None) -> np.ndarray:
    """Ids of rows (int64); ``frame_times`` None: every row is a still image."""
    if frame_times is None:
        return np.fromiter((image_id_for(u) for u in uris), dtype=np.int64, count=len(uris))
    return np.fromiter(
        (row_id(u, t) for u, t in zip(uris, frame_times, strict=True)),
        dtype=np.int64,
        count=len(uris),
    )


def table_row_ids(table: pa.Table) -> np.ndarray:
    """Ids of a table's rows from its ``uri`` and, where it has one, ``frame_time`` column
    (tables written before videos were read have none)."""
    uris = table.column("uri").to_pylist()
    if "frame_time" not in table.column_names:
        return row_ids(uris, None)
    return row_ids(uris, table.column("frame_time").to_pylist())


def read_with_frame_times(shard_uri: str, columns: list[str]) -> pa.Table:
    """``columns`` of a shard and its ``frame_time``, all null for a shard written before videos
    were read (it has no such column)."""
    from semclust import storage

    try:
        return storage.read_parquet(shard_uri, [*columns, "frame_time"])
    except (KeyError, pa.ArrowInvalid):
        table = storage.read_parquet(shard_uri, columns)
        return table.append_column("frame_time", pa.nulls(table.num_rows, pa.float32()))


def as_nullable(values: np.ndarray, *, missing_below: float = 0.0) -> pa.Array:
    """A float32 column with null where ``values`` is NaN or below ``missing_below``."""
    values = np.asarray(values, dtype=np.float32)
    mask = ~(values >= missing_below)  # NaN compares False
    return pa.array(values, pa.float32(), mask=mask)


def clock(seconds: float) -> str:
    """``m:ss.s`` (``h:mm:ss.s`` from an hour): how a frame's time is shown."""
    tenths = round(float(seconds) * 10)
    hours, rest = divmod(tenths, 36_000)
    minutes, rest = divmod(rest, 600)
    secs = rest / 10
    if hours:
        return f"{hours}:{minutes:02d}:{secs:04.1f}"
    return f"{minutes}:{secs:04.1f}"


def frame_label(uri: str, frame_time: float | None) -> str:
    """What a row is called in the report and in search results: the URI, and ``@ m:ss.s`` for a
    frame."""
    if frame_time is None or not frame_time >= 0:
        return uri
    return f"{uri} @ {clock(frame_time)}"
