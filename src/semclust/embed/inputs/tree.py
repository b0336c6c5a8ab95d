"""A folder, ``file://`` tree or ``s3://`` prefix (or a single file), listed in sorted URI order:
S3 keys in binary order, a local tree walked directory by directory (``storage.iter_file_pages``).

Its images are found by extension or content (``InputStream.image_page``). A folder whose every
file is a tar is a set of tar shards and lists their members (``tar.member_pages``); tars mixed
with loose images are ignored, with a warning. This kind accepts every input, so it is the last
one tried.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from semclust import storage
from semclust.embed.inputs.tar import is_tar, member_pages

if TYPE_CHECKING:
    from semclust.embed.sources import InputStream

log = logging.getLogger(__name__)


def matches(uri: str) -> bool:
    return True


def pages(stream: InputStream, uri: str) -> Iterator[pa.Table]:
    # While only tars have been seen, their URIs (one per shard, not per image) are held; the
    # first loose file turns them into ignored files.
    pending_tars: list[pa.Table] = []
    loose = False
    ignored_tars = 0
    for files in storage.iter_file_pages(
        uri, page_size=stream.page_size, s3_client=stream.s3_client
    ):
        tar_mask = np.array([is_tar(u) for u in files.column("uri").to_pylist()], dtype=bool)
        if not loose:
            if tar_mask.all():
                pending_tars.append(files)
                continue
            loose = True
            ignored_tars += sum(t.num_rows for t in pending_tars)
            pending_tars = []
        ignored_tars += int(tar_mask.sum())
        yield stream.image_page(files.filter(pa.array(~tar_mask)))
    if not loose and pending_tars:
        yield from member_pages(stream, pa.concat_tables(pending_tars).column("uri").to_pylist())
    if ignored_tars:
        log.warning("ignoring %d tar files mixed with loose images under %s", ignored_tars, uri)
