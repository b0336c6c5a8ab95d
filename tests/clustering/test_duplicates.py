"""Near-duplicate groups: components of a small known graph, the threshold on its edges, and
the parts and summary written from a knn/ folder."""

from __future__ import annotations

import numpy as np

from semclust import storage
from semclust.clustering.duplicates import duplicate_groups, strong_edges, write_duplicates
from semclust.rundir.embeddings import embedding_shards
from semclust.rundir.tables import knn_table, read_duplicates
from tests.clustering.synthetic import write_run


def test_duplicate_groups_are_connected_components():
    src = np.array([5, 7, 20, 30, 31], dtype=np.int64)
    dst = np.array([7, 9, 21, 31, 30], dtype=np.int64)
    ids, groups = duplicate_groups(src, dst)
    assert dict(zip(ids.tolist(), groups.tolist(), strict=True)) == {
        5: 5, 7: 5, 9: 5, 20: 20, 21: 20, 30: 30, 31: 30
    }  # fmt: skip
    empty = duplicate_groups(np.empty(0, np.int64), np.empty(0, np.int64))
    assert len(empty[0]) == len(empty[1]) == 0


def _write_knn(run_dir, ids, neighbors, sims):
    storage.write_parquet(
        str(run_dir / "knn" / "part-00000.parquet"), knn_table(ids, neighbors, sims)
    )


def test_threshold_keeps_only_strong_edges(tmp_path):
    ids = np.array([10, 11, 12, 13], dtype=np.int64)
    neighbors = np.array([[11, 12], [10, 13], [-1, 10], [11, 10]], dtype=np.int64)
    sims = np.array([[0.99, 0.5], [0.99, 0.96], [0.98, 0.5], [0.96, 0.1]], dtype=np.float32)
    _write_knn(tmp_path, ids, neighbors, sims)
    src, dst = strong_edges(str(tmp_path / "knn" / "part-00000.parquet"), 0.96)
    # -1 (no neighbour found) never counts, however similar.
    assert sorted(zip(src.tolist(), dst.tolist(), strict=True)) == [
        (10, 11), (11, 10), (11, 13), (13, 11)
    ]  # fmt: skip
    src, dst = strong_edges(str(tmp_path / "knn" / "part-00000.parquet"), 0.97)
    assert sorted(zip(src.tolist(), dst.tolist(), strict=True)) == [(10, 11), (11, 10)]


def test_groups_written_and_summarised_from_knn(tmp_path):
    x = np.eye(6, 8, dtype=np.float32) + 0.1
    ids = write_run(tmp_path, x, rows_per_part=6)
    # Rows 0-1-2 joined by strong edges (a chain), 4-5 by one; row 3 only by weak edges.
    neighbors = ids[[[1, 3], [2, 0], [1, 3], [0, 1], [5, 3], [4, 3]]]
    sims = np.array([[0.99, 0.2], [0.99, 0.99], [0.98, 0.2], [0.2, 0.2], [0.99, 0.2],
                     [0.99, 0.2]], dtype=np.float32)  # fmt: skip
    _write_knn(tmp_path, ids, neighbors, sims)
    summary = write_duplicates(str(tmp_path), embedding_shards(str(tmp_path)), 0.98)
    got_ids, groups = read_duplicates(str(tmp_path))
    members: dict[int, set[int]] = {}
    for i, g in zip(got_ids.tolist(), groups.tolist(), strict=True):
        members.setdefault(g, set()).add(i)
    assert sorted(map(sorted, members.values())) == sorted(
        [sorted(ids[[0, 1, 2]].tolist()), sorted(ids[[4, 5]].tolist())]
    )
    assert all(g == min(m) for g, m in members.items())  # a group's id: its smallest image id
    assert summary["groups"] == 2 and summary["images"] == 5 and summary["edges"] == 6
    assert [g["size"] for g in summary["largest"]] == [3, 2]
    # Examples in image id order, by URI (read from the embeddings).
    pair = sorted((4, 5), key=lambda r: int(ids[r]))
    assert summary["largest"][1]["examples"] == [f"file:///synthetic/img-{r:07d}.jpg" for r in pair]
    assert read_duplicates(str(tmp_path / "elsewhere")) is None
