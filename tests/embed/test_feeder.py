"""The streamed listing's hand-over to Ray Data: to-do blocks numbered into parts across pages,
and URI blocks padded so that they leave the never-ending read task at once."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from PIL import Image

from semclust import storage
from semclust.embed.actors import decode_stage
from semclust.embed.feeder import (
    PAD_COLUMN,
    READ_TARGET_BYTES,
    ListingProgress,
    pad_block,
    todo_blocks,
)


def test_todo_blocks_skip_committed_and_number_parts_across_pages():
    uris = [f"s3://b/{i:04d}.jpg" for i in range(100)]
    ids = np.array([storage.image_id_for(u) for u in uris])
    pages = [
        pa.table(
            {
                "uri": uris[i : i + 7],
                "offset": [-1] * len(uris[i : i + 7]),
                "size": [-1] * len(uris[i : i + 7]),
                "image_id": ids[i : i + 7],
            }
        )
        for i in range(0, 100, 7)
    ]
    done = np.sort(ids[::3])  # every third image already committed
    progress = ListingProgress()
    blocks = list(todo_blocks(iter(pages), done, 4, 10, 8, progress))
    table = pa.concat_tables(blocks)
    todo = [u for i, u in enumerate(uris) if i % 3]
    assert table["uri"].to_pylist() == todo
    assert [b.num_rows for b in blocks[:-1]] == [8] * (len(blocks) - 1)
    parts = table["part"].to_numpy()
    assert parts.tolist() == [4 + i // 10 for i in range(len(todo))]
    assert progress.already_committed == 34 and progress.rows_sent == len(todo) == 66
    assert table.column_names == ["uri", "offset", "size", "part"]


def test_padded_blocks_leave_the_read_task_at_once_and_decode_ignores_the_pad(tmp_path):
    """A URI block must exceed the dataset's block target by itself (else Ray Data holds it in
    the never-ending read task), and the pad must not reach the embeddings."""
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    uris = [f"file://{tmp_path}/red.png"] * 3
    for n in (1, 3):
        block = pa.table(
            {
                "uri": uris[:n],
                "offset": pa.array([-1] * n, pa.int64()),
                "size": pa.array([-1] * n, pa.int64()),
                "part": pa.array([7] * n, pa.int64()),
            }
        )
        padded = pad_block(block)
        assert padded.nbytes > READ_TARGET_BYTES > block.nbytes
        assert padded.nbytes < READ_TARGET_BYTES + 64 * 1024  # a little over, not double
        assert padded.drop_columns([PAD_COLUMN]).equals(block)
        batch = {
            name: padded.column(name).to_numpy(zero_copy_only=False) for name in padded.column_names
        }
        out = decode_stage(batch, size=32, resize="squash", max_pixels=10**7)
        assert PAD_COLUMN not in out and out["pixels"].shape == (n, 32, 32, 3)
        assert list(out["part"]) == [7] * n and list(out["error"]) == [""] * n
