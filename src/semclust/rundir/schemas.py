"""The Arrow schemas of the run directory's tables (one definition each, ARCHITECTURE.md)."""

from __future__ import annotations

import pyarrow as pa


def embeddings(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.int64()),
            ("uri", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
            ("width", pa.int32()),
            ("height", pa.int32()),
            # A video frame's time (seconds) and number in its video; null for a still image
            # (rundir/frames.py). Shards written before videos were read lack both columns.
            ("frame_time", pa.float32()),
            ("frame_index", pa.int32()),
        ]
    )


# frame_time: a failed video frame's time; null for an image or a video that could not be read.
FAILURES = pa.schema(
    [
        ("uri", pa.string()),
        ("stage", pa.string()),
        ("error", pa.string()),
        ("frame_time", pa.float32()),
    ]
)

ASSIGNMENTS = pa.schema(
    [
        ("image_id", pa.int64()),
        ("cluster", pa.int32()),
        ("distance", pa.float32()),
        ("cluster_2nd", pa.int32()),
        ("distance_2nd", pa.float32()),
    ]
)


def knn(k: int) -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.int64()),
            ("neighbors", pa.list_(pa.int64(), k)),
            ("similarities", pa.list_(pa.float32(), k)),
        ]
    )


DUPLICATES = pa.schema([("image_id", pa.int64()), ("group", pa.int64())])

LABELS = pa.schema(
    [
        ("image_id", pa.int64()),
        ("label", pa.string()),
        ("confidence", pa.float32()),
        ("source", pa.string()),
    ]
)

# frame_time: a video frame's time (null for a still image; absent in indexes built before).
INDEX_IDS = pa.schema(
    [("image_id", pa.int64()), ("uri", pa.string()), ("frame_time", pa.float32())]
)
