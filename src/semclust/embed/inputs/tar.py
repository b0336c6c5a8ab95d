"""WebDataset-style tar shards: the image members of each tar, with their byte ranges.

Only the headers are read (tarfile skips the data), and each member is listed as
``<tar URI>#<member name>`` with its offset and size, so that a decode task reads it with one
ranged read (``sources.read_image_bytes``). Tars come in the order of ``"<tar URI>#"``, members
sorted within each, which is the sorted order of the member URIs across tars. Side files
(``.cls``, ``.json``, ``.txt``) and hidden names are skipped. The input is one tar here; a folder
of them is listed by the ``tree`` kind, which hands its tars to ``member_pages``.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from semclust import storage
from semclust.embed.formats import is_image_candidate
from semclust.embed.members import TAR_SUFFIXES
from semclust.embed.sources import listing_page
from semclust.embed.video import has_video_extension
from semclust.retry import is_transient

if TYPE_CHECKING:
    from semclust.embed.sources import InputStream

log = logging.getLogger(__name__)


def is_tar(uri: str) -> bool:
    return uri.lower().endswith(TAR_SUFFIXES)


def matches(uri: str) -> bool:
    return is_tar(uri) and not storage.is_dir(uri)


def pages(stream: InputStream, uri: str) -> Iterator[pa.Table]:
    # The tar as a listing names it: file:///real/path, or the object's URI.
    yield from member_pages(stream, [storage.canonical_uri(uri)])


def member_pages(stream: InputStream, tar_uris: Iterable[str]) -> Iterator[pa.Table]:
    """Pages of the image members (and, with ``stream.sampling``, video members by extension) of
    ``tar_uris``, tar by tar."""
    # Sorting by "<tar>#" keeps the member URIs in their global sorted order across tars.
    for tar_uri in sorted(tar_uris, key=lambda u: u + "#"):
        fs, path = storage.resolve(tar_uri)
        try:
            f = fs.open_input_file(path)
        except OSError as exc:
            if is_transient(exc):
                raise
            # A dangling or unreadable shard: listed as itself, so its read fails and it is a
            # failure row (its members cannot be known).
            log.warning("cannot open tar shard %s: %s", tar_uri, exc)
            yield listing_page([tar_uri])
            continue
        rows: list[tuple[str, int, int]] = []
        with f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                media = is_image_candidate(name) or (
                    stream.sampling is not None and has_video_extension(name)
                )
                if name.rsplit("/", 1)[-1].startswith(".") or not media:
                    stream.skipped += 1  # WebDataset side files: .cls, .json, .txt
                    continue
                rows.append((f"{tar_uri}#{name}", member.offset_data, member.size))
        rows.sort()
        for start in range(0, len(rows), stream.page_size):
            chunk = rows[start : start + stream.page_size]
            yield listing_page([r[0] for r in chunk], [r[1] for r in chunk], [r[2] for r in chunk])
