"""The writer's commits and the run directory's bookkeeping: full parts first, then the last,
and lost rows detected before anything of their parts is committed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from semclust import storage
from semclust.embed.writer import PartWriter, committed_state, count_outputs


def _rows(uris: list[str], part: int) -> dict[str, np.ndarray]:
    n = len(uris)
    return {
        "uri": np.asarray(uris, dtype=object),
        "part": np.full(n, part, dtype=np.int64),
        "embedding": np.ones((n, 4), dtype=np.float32),
        "width": np.full(n, 8, dtype=np.int32),
        "height": np.full(n, 8, dtype=np.int32),
        "error": np.asarray([""] * n, dtype=object),
        "error_stage": np.asarray([""] * n, dtype=object),
    }


def test_part_writer_commits_full_parts_then_the_last_and_detects_lost_rows(tmp_path):
    uris = [f"file:///x/{i}.jpg" for i in range(25)]
    writer = PartWriter(str(tmp_path / "ok"), rows_per_part=10, dim=4)
    writer.add(_rows(uris[:6], 0))
    writer.add(_rows(uris[20:], 2))  # the last part, before the others are whole
    writer.add(_rows(uris[6:10], 0))
    assert storage.list_shards(str(tmp_path / "ok" / "embeddings")) != []  # part 0 committed
    writer.add(_rows(uris[10:20], 1))
    writer.finish(25, 0)
    assert writer.rows_written == 25 and writer.parts_committed == 3
    done, next_part = committed_state(str(tmp_path / "ok"))
    assert next_part == 3 and len(done) == 25
    ids = np.array([storage.image_id_for(u) for u in uris])
    assert count_outputs(str(tmp_path / "ok"), ids) == {
        "embedded": 25,
        "failed": 0,
        "duplicates": 0,
        "stale": 0,
    }
    assert count_outputs(str(tmp_path / "ok"), set(ids[:20].tolist()))["stale"] == 5

    # Rows lost inside a full part: that part never completes.
    writer = PartWriter(str(tmp_path / "lost"), rows_per_part=10, dim=4)
    writer.add(_rows(uris[:9], 0))
    writer.add(_rows(uris[10:20], 1))
    writer.add(_rows(uris[20:], 2))
    with pytest.raises(RuntimeError, match=r"lost rows.*sent 25 rows.*received 24.*\{0: 1\}"):
        writer.finish(25, 0)
    assert [Path(u).name for u in storage.list_shards(str(tmp_path / "lost" / "embeddings"))] == [
        "part-00001.parquet"
    ]

    # The whole last part lost: every part seen is complete, the total is not.
    writer = PartWriter(str(tmp_path / "tail"), rows_per_part=10, dim=4)
    writer.add(_rows(uris[:10], 5))
    writer.add(_rows(uris[10:20], 6))
    with pytest.raises(RuntimeError, match="lost rows"):
        writer.finish(25, 5)


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
    writer = PartWriter(run_dir, rows_per_part=10, dim=4)
    writer.add(rows)
    writer.finish(10, 0)
    assert (writer.rows_written, writer.failed_written, writer.deferred) == (8, 1, 2)
    ids = np.sort(np.array([storage.image_id_for(u) for u in uris]))
    with pytest.raises(ImagesDeferred, match="2 of 10 images could not be read") as stopped:
        check_counts(run_dir, ids, writer.deferred, writer.deferred_error)
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
