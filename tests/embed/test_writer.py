"""The write tasks' commits and the run directory's bookkeeping: each whole part committed
under its own number (failures first, embeddings last), a retried commit rewriting the same
files, a piece of a part refused, and a run that lost its lock stopped before it writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from semclust import storage
from semclust.embed.writer import PartCommitter, committed_state, count_outputs
from semclust.errors import RunDirLocked


def _rows(uris: list[str], part: int, part_rows: int | None = None) -> dict[str, np.ndarray]:
    n = len(uris)
    return {
        "uri": np.asarray(uris, dtype=object),
        "part": np.full(n, part, dtype=np.int64),
        "part_rows": np.full(n, n if part_rows is None else part_rows, dtype=np.int64),
        "embedding": np.arange(n * 4, dtype=np.float32).reshape(n, 4),
        "width": np.full(n, 8, dtype=np.int32),
        "height": np.full(n, 8, dtype=np.int32),
        "error": np.asarray([""] * n, dtype=object),
        "error_stage": np.asarray([""] * n, dtype=object),
    }


def _concat(*batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_whole_parts_commit_under_their_numbers_and_a_retry_adds_nothing(tmp_path):
    uris = [f"file:///x/{i}.jpg" for i in range(25)]
    run_dir = str(tmp_path / "ok")
    commit = PartCommitter(run_dir, dim=4)
    # One batch may hold several whole parts (and their records come back in part order).
    records = commit(_concat(_rows(uris[10:20], 1), _rows(uris[:10], 0)))
    assert records["part"].tolist() == [0, 1] and records["embedded"].tolist() == [10, 10]
    commit(_rows(uris[20:], 2))
    commit(_rows(uris[20:], 2))  # a re-executed write task: the same file again
    names = [Path(u).name for u in storage.list_shards(storage.join(run_dir, "embeddings"))]
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    done, next_part = committed_state(run_dir)
    assert next_part == 3 and len(done) == 25
    ids = np.array([storage.image_id_for(u) for u in uris])
    assert count_outputs(run_dir, ids) == {"embedded": 25, "failed": 0, "duplicates": 0, "stale": 0}
    assert count_outputs(run_dir, set(ids[:20].tolist()))["stale"] == 5
    part1 = storage.read_parquet(storage.join(run_dir, "embeddings", "part-00001.parquet"))
    assert part1["uri"].to_pylist() == uris[10:20]
    np.testing.assert_array_equal(
        np.stack(part1["embedding"].to_numpy(zero_copy_only=False)),
        np.arange(40, dtype=np.float32).reshape(10, 4),
    )


def test_a_piece_of_a_part_is_refused_and_commits_nothing(tmp_path):
    run_dir = str(tmp_path / "piece")
    uris = [f"file:///x/{i}.jpg" for i in range(10)]
    with pytest.raises(RuntimeError, match="part 3 reached the writer as 6 of 10 rows"):
        PartCommitter(run_dir, dim=4)(_rows(uris[:6], 3, part_rows=10))
    assert storage.list_shards(storage.join(run_dir, "embeddings")) == []


def test_a_write_task_of_a_run_that_lost_its_lock_writes_nothing(tmp_path):
    from semclust.lock import RunDirLock

    run_dir = str(tmp_path / "locked")
    storage.makedirs(run_dir)
    uris = [f"file:///x/{i}.jpg" for i in range(4)]
    with RunDirLock(run_dir, command="test") as lock:
        PartCommitter(run_dir, 4, lock.token)(_rows(uris, 0))  # held: commits
        with pytest.raises(RunDirLocked, match="lost the lock"):
            PartCommitter(run_dir, 4, "another run's token")(_rows(uris, 1))
    with pytest.raises(RunDirLocked, match="it was removed"):
        PartCommitter(run_dir, 4, lock.token)(_rows(uris, 2))  # released: nobody holds it
    names = [Path(u).name for u in storage.list_shards(storage.join(run_dir, "embeddings"))]
    assert names == ["part-00000.parquet"]


def test_deferred_rows_commit_nowhere_and_stop_the_stage_with_the_counts(tmp_path):
    """Rows whose read failed for a transient reason are neither embedded nor failures: their
    part commits without them, and the final check stops with the counts run.json records."""
    from semclust.embed.writer import DEFERRED, ImagesDeferred, check_counts
    from semclust.errors import StoreUnavailable

    uris = [f"file:///x/{i}.jpg" for i in range(10)]
    rows = _rows(uris, 0)
    rows["error"][[2, 7]] = "read failed: OSError: connection reset"
    rows["error_stage"][[2, 7]] = DEFERRED
    rows["error"][5] = "not a recognised image format"
    rows["error_stage"][5] = "decode"
    run_dir = str(tmp_path / "run")
    record = PartCommitter(run_dir, dim=4)(rows)
    assert (record["embedded"][0], record["failed"][0], record["deferred"][0]) == (7, 1, 2)
    error = record["deferred_error"][0]
    assert error == "read failed: OSError: connection reset"
    ids = np.sort(np.array([storage.image_id_for(u) for u in uris]))
    with pytest.raises(ImagesDeferred, match="2 of 10 images could not be read") as stopped:
        check_counts(run_dir, ids, 2, error)
    assert isinstance(stopped.value, StoreUnavailable)
    assert stopped.value.record == {
        "listed": 10,
        "embedded": 7,
        "failed": 1,
        "deferred": 2,
        "last_read_error": "read failed: OSError: connection reset",
    }
    # The resume finds the deferred images not committed: they are to do again.
    done, next_part = committed_state(run_dir)
    assert next_part == 1 and len(done) == 8
    assert not np.isin([storage.image_id_for(uris[i]) for i in (2, 7)], done).any()
    # Without deferred rows, a gap is a bug, not an outage.
    with pytest.raises(RuntimeError, match="listed=10 but embedded=7"):
        check_counts(run_dir, ids, 0, "")
