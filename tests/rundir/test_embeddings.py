"""Reading a run's embeddings: the shard set (rows, dim, fingerprint, mixed dims), checked
reads, seeded samples that read only the shards they draw from, id -> row lookups, and the
clusters of rows from an assignments folder."""

from __future__ import annotations

import numpy as np
import pytest

from semclust import storage
from semclust.errors import UserError
from semclust.rundir import embeddings
from semclust.rundir.embeddings import (
    RunRows,
    embedding_shards,
    normalize_rows,
    read_checked,
    read_clusters,
    rows_of_ids,
    sample_rows,
    sample_size,
)
from semclust.rundir.tables import assignments_table
from tests.clustering.synthetic import planted, write_run


@pytest.fixture
def run(tmp_path):
    """1,000 rows of 8 dimensions in parts of 300, 300, 300 and 100 rows."""
    x, _, _ = planted(1_000, 4, 8, noise=0.5, seed=2)
    ids = write_run(tmp_path, x, rows_per_part=300)
    return tmp_path, x, ids


def test_shard_set(run):
    run_dir, _, _ = run
    shards = embedding_shards(str(run_dir))
    assert [u.rsplit("/", 1)[-1] for u in shards.uris] == [
        f"part-{i:05d}.parquet" for i in range(4)
    ]
    assert shards.rows == [300, 300, 300, 100] and shards.total == 1_000 and shards.dim == 8
    same = embedding_shards(str(run_dir)).fingerprint()
    assert same == shards.fingerprint()
    write_run(run_dir, planted(50, 2, 8, noise=0.5, seed=3)[0], rows_per_part=50, first_part=4)
    assert embedding_shards(str(run_dir)).fingerprint() != same  # a shard added


def test_mixed_dimensions_and_no_embeddings_are_refused(tmp_path):
    write_run(tmp_path, planted(20, 2, 16, noise=0.3, seed=1)[0], rows_per_part=20)
    other = planted(20, 2, 32, noise=0.3, seed=1)[0]
    write_run(tmp_path, other, rows_per_part=20, first_part=1, prefix="other")
    with pytest.raises(ValueError, match=r"mixed dimensions: 16 \(e\.g\. .*part-00000.*32"):
        embedding_shards(str(tmp_path))
    with pytest.raises(UserError, match=r"no embeddings under .*: run `semclust embed`"):
        embedding_shards(str(tmp_path / "empty"))


def test_checked_reads(tmp_path):
    x, _, _ = planted(10, 2, 4, noise=0.3, seed=0)
    ids = write_run(tmp_path, x, rows_per_part=10)
    uri = embedding_shards(str(tmp_path)).uris[0]
    got_ids, vectors = read_checked(uri, 4)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(vectors, x)
    with pytest.raises(ValueError, match="holds 4-d embeddings but 8-d were expected"):
        read_checked(uri, 8)
    x[3] = np.inf
    write_run(tmp_path, x, rows_per_part=10)
    with pytest.raises(ValueError, match=r"1 embeddings in .* contain NaN or inf"):
        read_checked(uri, 4)


def test_sample_rows_is_seeded_uniform_and_reads_only_drawn_shards(run, monkeypatch):
    run_dir, x, ids = run
    shards = embedding_shards(str(run_dir))
    read: list[str] = []
    real = embeddings.read_checked

    def spy(uri: str, dim: int):  # the real read, noting which shards were opened
        read.append(uri)
        return real(uri, dim)

    monkeypatch.setattr(embeddings, "read_checked", spy)
    got_ids, rows = sample_rows(shards, 5, seed=7, with_ids=True)
    assert len(set(got_ids.tolist())) == 5
    where = np.array([np.flatnonzero(ids == i)[0] for i in got_ids])
    np.testing.assert_array_equal(rows, x[where])
    assert (np.diff(where) > 0).all()  # in shard order
    drawn = sorted({int(w) // 300 for w in where})
    assert sorted(read) == [shards.uris[p] for p in drawn]  # no other shard was read
    np.testing.assert_array_equal(sample_rows(shards, 5, seed=7), rows)
    assert not np.array_equal(sample_rows(shards, 5, seed=8), rows)
    everything = sample_rows(shards, 5_000, seed=1)  # more than there are: every row once
    np.testing.assert_array_equal(everything, x)
    assert sample_size(1_000, 8, 3_200) == 100 and sample_size(10, 8, 1 << 30) == 10


def test_rows_of_ids_with_absent_ids():
    ids = np.array([40, 10, 30, 20], dtype=np.int64)
    order = np.argsort(ids)
    assert rows_of_ids(ids, order, np.array([10, 20, 30, 40])).tolist() == [1, 3, 2, 0]
    assert rows_of_ids(ids, order, np.array([[5, 30], [99, 40]])).tolist() == [[-1, 2], [-1, 0]]
    empty = np.empty(0, np.int64)
    assert rows_of_ids(empty, empty, np.array([1, 2])).tolist() == [-1, -1]


def test_gather_reads_only_the_shards_holding_the_rows(run, monkeypatch):
    run_dir, x, _ = run
    rows = RunRows.load(str(run_dir))
    read: list[str] = []
    real = embeddings.read_checked

    def spy(uri: str, dim: int):
        read.append(uri)
        return real(uri, dim)

    monkeypatch.setattr(embeddings, "read_checked", spy)
    wanted = np.array([999, 0, 950, 5, 0])  # shards 3 and 0, in any order, one row twice
    np.testing.assert_allclose(rows.gather(wanted), normalize_rows(x[wanted]), rtol=1e-6)
    assert read == [rows.shard_uris[0], rows.shard_uris[3]]
    assert rows.gather(np.empty(0, np.int64)).shape == (0, 8) and len(read) == 2


def test_run_rows_and_read_clusters(run):
    run_dir, x, ids = run
    rows = RunRows.load(str(run_dir), with_uris=True)
    assert len(rows) == 1_000 and rows.dim == 8
    assert rows.uris[3] == "file:///synthetic/img-0000003.jpg"
    assert rows.rows_of(ids[[5, 999]]).tolist() == [5, 999]
    np.testing.assert_allclose(rows.gather(np.array([999, 0])), normalize_rows(x[[999, 0]]))
    # Clusters of part of the rows only: the others get -1.
    clusters = np.arange(1_000) % 3
    labels = np.stack([clusters, (clusters + 1) % 3], axis=1)
    table = assignments_table(ids[:600], labels[:600], np.zeros((600, 2), np.float32))
    storage.write_parquet(str(run_dir / "assignments_dec" / "part-00000.parquet"), table)
    got = read_clusters(str(run_dir), "assignments_dec", rows)
    np.testing.assert_array_equal(got[:600], clusters[:600])
    assert (got[600:] == -1).all()


def test_normalize_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(normalize_rows(x), [[0.6, 0.8], [0.0, 0.0]])
