"""The run directory's tables after the embeddings: assignments, knn/, duplicates/ and the
index's ids, written and read back through ``rundir.tables`` in the schemas of
``rundir.schemas``."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from semclust import storage
from semclust.errors import UserError
from semclust.rundir import schemas, tables


def test_assignments_round_trip(tmp_path):
    ids = np.array([7, 3, 5], dtype=np.int64)
    labels = np.array([[1, 0], [0, 2], [2, 1]])
    dist = np.array([[0.1, 0.5], [0.2, 0.3], [0.0, 0.9]])
    for part, rows in enumerate((slice(0, 2), slice(2, 3))):
        table = tables.assignments_table(ids[rows], labels[rows], dist[rows])
        assert table.schema == schemas.ASSIGNMENTS
        storage.write_parquet(str(tmp_path / "assignments" / f"part-{part:05d}.parquet"), table)
    got = tables.read_assignments(str(tmp_path))
    assert got["image_id"].to_pylist() == [7, 3, 5]
    assert got["cluster_2nd"].to_pylist() == [0, 2, 1]
    np.testing.assert_allclose(got["distance"].to_numpy(), [0.1, 0.2, 0.0])
    with pytest.raises(UserError, match=r"no assignments_scan/ in .*: run `semclust refine`"):
        tables.read_assignments(str(tmp_path), "assignments_scan")
    assert tables.part_uri("s3://b/run", "knn", "s3://b/run/embeddings/part-00042.parquet") == (
        "s3://b/run/knn/part-00042.parquet"
    )


def _write_knn(run_dir, part: int, ids, neighbors, sims) -> None:
    table = tables.knn_table(np.array(ids), np.array(neighbors), np.array(sims))
    storage.write_parquet(str(run_dir / "knn" / f"part-{part:05d}.parquet"), table)


def test_knn_round_trip_part_by_part_and_whole(tmp_path):
    _write_knn(tmp_path, 0, [1, 2], [[2, 3], [1, -1]], [[0.9, 0.5], [0.9, -np.inf]])
    _write_knn(tmp_path, 1, [3], [[1, 2]], [[0.5, 0.4]])
    schema = pq.read_schema(tmp_path / "knn" / "part-00000.parquet")
    assert schema.remove_metadata() == schemas.knn(2)
    parts = list(tables.iter_knn(str(tmp_path), similarities=False))
    assert [p.ids.tolist() for p in parts] == [[1, 2], [3]]
    assert parts[0].neighbors.tolist() == [[2, 3], [1, -1]] and parts[0].similarities is None
    assert parts[0].k == 2
    ids, neighbors, sims = tables.read_knn(str(tmp_path))
    assert ids.tolist() == [1, 2, 3] and neighbors.dtype == np.int64
    assert neighbors.tolist() == [[2, 3], [1, -1], [1, 2]]
    np.testing.assert_allclose(sims, [[0.9, 0.5], [0.9, -np.inf], [0.5, 0.4]])
    assert sims.dtype == np.float32
    with pytest.raises(UserError, match=r"no kNN graph in .*: run `semclust graph` first"):
        tables.read_knn(str(tmp_path / "other"))
    assert tables.knn_parts(str(tmp_path / "other")) == []
    _write_knn(tmp_path, 2, [4], [[1, 2, 3]], [[0.5, 0.4, 0.3]])
    with pytest.raises(UserError, match="different k"):
        tables.read_knn(str(tmp_path))


def test_duplicates_round_trip(tmp_path):
    assert tables.read_duplicates(str(tmp_path)) is None
    table = tables.duplicates_table(np.array([4, 9, 2]), np.array([4, 4, 2]))
    assert table.schema == schemas.DUPLICATES
    storage.write_parquet(str(tmp_path / "duplicates" / "part-00000.parquet"), table)
    ids, groups = tables.read_duplicates(str(tmp_path))
    assert ids.tolist() == [4, 9, 2] and groups.tolist() == [4, 4, 2]


def test_index_ids(tmp_path):
    import pyarrow as pa

    table = pa.table(
        {"image_id": [11, 22], "uri": ["a.jpg", "v.mp4"], "frame_time": [None, 30.0]},
        schema=schemas.INDEX_IDS,
    )
    storage.write_parquet(tables.index_file(str(tmp_path), tables.INDEX_IDS), table)
    ids, uris, times = tables.read_index_ids(str(tmp_path))
    assert ids.tolist() == [11, 22] and uris.to_pylist() == ["a.jpg", "v.mp4"]
    assert np.isnan(times[0]) and times[1] == 30.0
    # An index built before videos were read: no frame_time column, every row a still image.
    old = pa.table({"image_id": [11], "uri": ["a.jpg"]})
    storage.write_parquet(tables.index_file(str(tmp_path), tables.INDEX_IDS), old)
    ids, uris, times = tables.read_index_ids(str(tmp_path))
    assert ids.tolist() == [11] and np.isnan(times).all()
    assert tables.index_file("s3://b/run", tables.INDEX_META) == "s3://b/run/index/meta.json"
