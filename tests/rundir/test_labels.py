"""Readers of labels/ and failures/: whole tables in part order, counts over every part, the
failure listing capped after merging the parts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from semclust import storage
from semclust.rundir import schemas
from semclust.rundir.labels import read_failures, read_labels


def _write(run, folder: str, part: int, table: pa.Table) -> None:
    storage.write_parquet(str(run / folder / f"part-{part:05d}.parquet"), table)


def test_labels_in_part_order_without_empty_labels(tmp_path):
    assert read_labels(str(tmp_path)) is None
    for part, (ids, labels) in enumerate((([5, 3], ["cat", None]), ([9], ["dog"]))):
        table = pa.table(
            {
                "image_id": pa.array(ids, pa.int64()),
                "label": pa.array(labels, pa.string()),
                "confidence": pa.array(np.full(len(ids), 0.5), pa.float32()),
                "source": pa.array(["seed"] * len(ids), pa.string()),
            },
            schema=schemas.LABELS,
        )
        _write(tmp_path, "labels", part, table)
    table = read_labels(str(tmp_path))
    assert table is not None and table.schema == schemas.LABELS
    assert table.column("image_id").to_pylist() == [5, 9]  # the row without a label is dropped
    assert table.column("label").to_pylist() == ["cat", "dog"]
    ids_only = read_labels(str(tmp_path), ["image_id"])
    assert ids_only is not None and ids_only.column_names == ["image_id"]
    assert ids_only.num_rows == 3  # no label column read, nothing to filter on


def test_failures_counted_over_every_part_and_listed_up_to_the_cap(tmp_path):
    empty = read_failures(str(tmp_path), limit=10)
    assert (empty.total, empty.by_stage, empty.top_reasons, empty.rows) == (0, [], [], [])
    rng = np.random.default_rng(0)
    rows = [
        (f"s3://b/img-{i:03d}.jpg", "decode" if i % 3 else "read", f"error {i % 2}")
        for i in rng.permutation(40)
    ]
    for part, chunk in enumerate((rows[:15], rows[15:16], rows[16:])):
        uris, stages, errors = zip(*chunk, strict=True)
        table = pa.table(
            {"uri": uris, "stage": stages, "error": errors, "frame_time": [None] * len(uris)},
            schema=schemas.FAILURES,
        )
        _write(tmp_path, "failures", part, table)

    got = read_failures(str(tmp_path), limit=5, top=3)
    assert got.total == 40
    assert got.rows == sorted(rows)[:5]  # the first five by URI across all parts
    stages = {s: sum(r[1] == s for r in rows) for s in ("decode", "read")}
    assert got.by_stage == sorted(stages.items(), key=lambda s: -s[1])
    reasons = {}
    for _, stage, error in rows:
        reasons[stage, error] = reasons.get((stage, error), 0) + 1
    expected = sorted(reasons.items(), key=lambda r: (-r[1], r[0]))[:3]
    assert got.top_reasons == [(s, e, n) for (s, e), n in expected]
    assert len(read_failures(str(tmp_path), limit=100).rows) == 40
