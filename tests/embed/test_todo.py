"""The embed stage's to-do list: listed pages cut into numbered parts (skipping what is
committed), written to the run directory, and read back one read task per part."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from semclust import storage
from semclust.embed.sources import listing_page
from semclust.embed.todo import (
    TODO_SCHEMA,
    TodoProgress,
    cut_parts,
    read_part,
    todo_dir,
    write_todo,
)


def _pages(uris: list[str], page_rows: int) -> list[pa.Table]:
    return [listing_page(uris[i : i + page_rows]) for i in range(0, len(uris), page_rows)]


def test_parts_skip_committed_rows_and_are_numbered_in_listing_order_across_pages():
    uris = [f"s3://b/{i:04d}.jpg" for i in range(100)]
    done = np.sort([storage.image_id_for(u) for u in uris[::3]])  # every third committed
    progress = TodoProgress()
    parts = list(cut_parts(_pages(uris, 7), done, 4, 10, progress))
    todo = [u for i, u in enumerate(uris) if i % 3]
    table = pa.concat_tables(parts)
    assert table["uri"].to_pylist() == todo
    assert [p.num_rows for p in parts] == [10] * 6 + [6]
    assert table["part"].to_pylist() == [4 + i // 10 for i in range(len(todo))]
    assert progress.already_committed == 34 and progress.rows == len(todo) == 66
    assert table.schema == TODO_SCHEMA  # the image_id is left behind: the writer derives it
    # Fresh tables, not slices of a page: a part shipped to a worker carries only itself.
    assert all(p.column("uri").num_chunks == 1 for p in parts)


def test_write_todo_replaces_an_old_list_and_read_part_tells_each_row_its_part_size(tmp_path):
    run_dir = str(tmp_path / "run")
    stale = storage.join(todo_dir(run_dir), "part-00099.parquet")
    storage.write_parquet(stale, pa.table({"uri": ["x"]}))  # a list left by a killed run
    uris = [f"file:///x/{i:03d}.jpg" for i in range(23)]
    progress = TodoProgress()
    parts = write_todo(run_dir, _pages(uris, 5), np.empty(0, np.int64), 2, 10, progress)
    assert [(p.part, p.rows) for p in parts] == [(2, 10), (3, 10), (4, 3)]
    assert not storage.exists(stale)
    assert sorted(storage.list_shards(todo_dir(run_dir))) == [p.uri for p in parts]
    last = read_part(parts[-1].uri)
    assert last["uri"].to_pylist() == uris[20:]
    assert last["part"].to_pylist() == [4] * 3 and last["part_rows"].to_pylist() == [3] * 3


def test_no_todo_rows_write_no_parts(tmp_path):
    uris = [f"file:///x/{i}.jpg" for i in range(4)]
    done = np.sort([storage.image_id_for(u) for u in uris])
    progress = TodoProgress()
    assert write_todo(str(tmp_path), _pages(uris, 3), done, 0, 10, progress) == []
    assert progress.already_committed == 4


@pytest.mark.parametrize("rows_per_part", [1, 3])
def test_every_row_lands_in_exactly_one_part(rows_per_part):
    uris = [f"s3://b/{i}.jpg" for i in range(8)]
    parts = list(
        cut_parts(_pages(uris, 5), np.empty(0, np.int64), 0, rows_per_part, TodoProgress())
    )
    assert pa.concat_tables(parts)["uri"].to_pylist() == uris
    assert len({p["part"][0].as_py() for p in parts}) == len(parts) == -(-8 // rows_per_part)
