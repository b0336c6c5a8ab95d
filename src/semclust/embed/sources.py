"""Where images come from, the shared core: pages, id sets, the input stream, image reads.

Every input is listed as a stream of pages (``pyarrow.Table``: ``uri``, ``offset``, ``size``,
``image_id``), so that a catalogue of tens of millions of images never sits on the driver as
Python objects. ``InputStream`` yields the pages and keeps the counts (skipped, duplicates) and
the listed ids (a compact sorted numpy array, 8 bytes per image, used for de-duplication and the
final ``listed = embedded + failed`` check).

What an input is, and how it is listed, is an input kind: one module of
``semclust.embed.inputs`` per kind (a manifest of URIs, WebDataset-style tar shards, a folder or
prefix), registered in ``semclust.registry.INPUT_KINDS``; the first kind whose ``matches``
accepts the input lists it (``input_kind``). Order: folders and prefixes come in sorted URI
order; tar shards tar by tar, each tar's members sorted; manifests in their own row order. For
images inside tar shards, ``offset`` and ``size`` give the member's byte range, so a decode task
reads it with one ranged read; a member's URI is ``<tar URI>#<member name>``, both parts raw
(``tar_member_parts`` splits it). ``offset``/``size`` are -1 for whole files.

What is listed from a folder or prefix (``InputStream.image_page``): a file with an image
extension (decodable or known-unsupported, see ``formats.is_image_candidate``); else a file
whose first bytes are an image's signature; else an entry that cannot be read at all (a dangling
symlink, a link loop, a file without read permission, a directory that cannot be scanned),
whatever its name, because skipping it would hide it: its read fails and it becomes a
``failures/`` row.

``list_inputs``/``list_images`` gather a stream into a ``Listing`` (a Python list), a
convenience for small inputs (reference images, search queries); the embed stage consumes the
stream itself.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa

from semclust import registry, storage
from semclust.embed.formats import is_image_candidate
from semclust.embed.members import tar_member_parts
from semclust.embed.video import Sampling, frame_rows, has_video_extension, sniff_video_format
from semclust.retry import is_transient, retry_call
from semclust.rundir.frames import UNREADABLE_VIDEO

_SNIFF_BYTES = 64
PAGE_SIZE = storage.LIST_PAGE_SIZE  # rows per listing page (and S3 keys per request)

PAGE_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("image_id", pa.int64()),
        # A video's frames (rundir/frames.py): seconds from its start and the frame's number;
        # NaN and -1 for a still image (frames.UNREADABLE_VIDEO: a video that could not be read).
        ("frame_time", pa.float32()),
        ("frame_index", pa.int32()),
    ]
)


@dataclass(frozen=True)
class Listing:
    """Images to embed. ``offsets``/``sizes`` are -1 except for members of tar shards."""

    uris: list[str]
    skipped: int = 0  # files that are not images (by extension and content)
    duplicates: int = 0  # repeated URIs in a manifest, listed once
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def table(self) -> pa.Table:
        n = len(self.uris)
        return pa.table(
            {
                "uri": pa.array(self.uris, pa.string()),
                "offset": pa.array(self.offsets or [-1] * n, pa.int64()),
                "size": pa.array(self.sizes or [-1] * n, pa.int64()),
            }
        )


# --- compact id sets -----------------------------------------------------------------------------


def isin_sorted(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_ids)`` for an already sorted array, by binary search."""
    values = np.asarray(values, dtype=np.int64)
    if len(sorted_ids) == 0 or len(values) == 0:
        return np.zeros(len(values), dtype=bool)
    idx = np.minimum(np.searchsorted(sorted_ids, values), len(sorted_ids) - 1)
    return sorted_ids[idx] == values


class IdSet:
    """A growing set of int64 ids: 8 bytes per id, no Python object per id.

    Kept as a few sorted, disjoint numpy runs; a run is merged into the previous one when that is
    at most twice its size (a log-structured merge), so there are O(log n) runs and each id is
    copied O(log n) times in all.
    """

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs)

    def add_new(self, ids: np.ndarray) -> np.ndarray:
        """Add ``ids``; returns the mask of those not seen before (first occurrence only)."""
        ids = np.asarray(ids, dtype=np.int64)
        uniq, first = np.unique(ids, return_index=True)
        seen = np.zeros(len(uniq), dtype=bool)
        for run in self._runs:
            seen |= isin_sorted(uniq, run)
        mask = np.zeros(len(ids), dtype=bool)
        mask[first[~seen]] = True
        new = uniq[~seen]
        if len(new):
            self._runs.append(new)
            while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
                last = self._runs.pop()
                self._runs[-1] = np.sort(np.concatenate([self._runs[-1], last]))
        return mask

    def sorted(self) -> np.ndarray:
        """All ids, sorted (merges the runs into one)."""
        if not self._runs:
            return np.empty(0, dtype=np.int64)
        if len(self._runs) > 1:
            self._runs = [np.sort(np.concatenate(self._runs))]
        return self._runs[0]


def ids_for(uris: Iterable[str]) -> np.ndarray:
    """Image ids of URIs as an int64 array."""
    return np.fromiter((storage.image_id_for(u) for u in uris), dtype=np.int64)


# --- the streamed listing ------------------------------------------------------------------------


def listing_page(
    uris: list[str], offsets: list[int] | None = None, sizes: list[int] | None = None
) -> pa.Table:
    """A listing page (``PAGE_SCHEMA``) of ``uris``; ``offsets``/``sizes`` default to -1 (whole
    files)."""
    n = len(uris)
    return pa.table(
        {
            "uri": pa.array(uris, pa.string()),
            "offset": pa.array(offsets if offsets is not None else [-1] * n, pa.int64()),
            "size": pa.array(sizes if sizes is not None else [-1] * n, pa.int64()),
            "image_id": pa.array(ids_for(uris), pa.int64()),
            "frame_time": pa.array(np.full(n, np.nan, dtype=np.float32)),
            "frame_index": pa.array(np.full(n, -1, dtype=np.int32)),
        },
        schema=PAGE_SCHEMA,
    )


def input_kind(uri: str) -> ModuleType:
    """The module of ``semclust.embed.inputs`` that lists ``uri``: the first kind of
    ``registry.INPUT_KINDS`` whose ``matches`` accepts it."""
    for name in registry.INPUT_KINDS:
        module = registry.input_kind(name)
        if module.matches(uri):
            return module
    raise ValueError(f"no input kind lists {uri!r}; kinds: {', '.join(registry.INPUT_KINDS)}")


class InputStream:
    """The streamed listing of one input: iterate ``pages()`` once, then read the counts.

    Counts grow while the pages are consumed: ``listed`` (unique images yielded so far),
    ``skipped`` (files that are not images), ``duplicates`` (repeated URIs, yielded once),
    ``pages`` (pages yielded), ``seconds`` (wall time spent listing, set when it ends).

    ``sampling`` (``video.Sampling``): list videos too, one row per sampled frame (folders and
    prefixes find them by extension or content, manifests and tars by extension); each video is
    probed here for its duration (``video.probe``: its header, by ranged reads). Counted in
    ``videos`` (listed), ``video_frames`` (their frame rows) and ``videos_unreadable`` (listed as
    one row that becomes a failure). Without it, videos are not images: skipped in folders.
    """

    def __init__(
        self,
        input_uri: str,
        *,
        page_size: int = PAGE_SIZE,
        s3_client: Any = None,
        sampling: Sampling | None = None,
    ) -> None:
        self.input_uri = input_uri
        self.page_size = page_size
        self.s3_client = s3_client
        self.sampling = sampling
        self.videos = 0
        self.video_frames = 0
        self.videos_unreadable = 0
        self._sniffed_videos: set[str] = set()
        self.listed = 0
        self.skipped = 0
        self.duplicates = 0
        self.pages_yielded = 0
        self.seconds: float | None = None
        self.done = False
        self._ids = IdSet()

    def pages(self) -> Iterator[pa.Table]:
        """Pages of unique images (``PAGE_SCHEMA``), fetched only as they are consumed."""
        storage.check_access(self.input_uri, must_exist=True)
        busy = 0.0  # time inside the listing, not in the consumer
        t0 = time.perf_counter()
        for table in input_kind(self.input_uri).pages(self, self.input_uri):
            if self.sampling is not None and table.num_rows:
                table = self._expand_videos(table)
            if table.num_rows == 0:
                continue
            mask = self._ids.add_new(table.column("image_id").to_numpy())
            self.duplicates += int(table.num_rows - mask.sum())
            if not mask.all():
                table = table.filter(pa.array(mask))
            if table.num_rows == 0:
                continue
            self._count_videos(table)
            self.listed += table.num_rows
            self.pages_yielded += 1
            busy += time.perf_counter() - t0
            yield table
            t0 = time.perf_counter()
        self.seconds = busy + time.perf_counter() - t0
        self.done = True

    def _expand_videos(self, table: pa.Table) -> pa.Table:
        """The page with each video's row replaced by its sampled frames' rows (in time order),
        or by one ``UNREADABLE_VIDEO`` row when it cannot be probed (its decode task records
        why). A store that stays away is raised, as for a listing request."""
        uris = table.column("uri").to_pylist()
        sniffed = self._sniffed_videos
        videos = [i for i, u in enumerate(uris) if has_video_extension(u) or u in sniffed]
        self._sniffed_videos.clear()
        if not videos:
            return table
        return frame_rows(table, videos, self.sampling)

    def _count_videos(self, table: pa.Table) -> None:
        if self.sampling is None:
            return
        index = table.column("frame_index").to_numpy()
        times = table.column("frame_time").to_numpy()
        unreadable = int((times == UNREADABLE_VIDEO).sum())
        self.videos += int((index == 0).sum()) + unreadable
        self.video_frames += int((index >= 0).sum())
        self.videos_unreadable += unreadable

    def listed_ids(self) -> np.ndarray:
        """Sorted ids of every image yielded so far."""
        return self._ids.sorted()

    def image_page(self, files: pa.Table) -> pa.Table:
        """Images of one page of files (``uri``, ``size``): by extension, else by sniffing the
        first bytes; an entry that cannot be read is listed too (its read will fail and be a
        failure row). Counts the others as ``skipped``."""
        uris: list[str] = []
        for uri, size in zip(
            files.column("uri").to_pylist(), files.column("size").to_pylist(), strict=True
        ):
            if is_image_candidate(uri) or (self.sampling is not None and has_video_extension(uri)):
                uris.append(uri)
                continue
            head = _head(uri, size)
            if head is None or is_image_candidate(uri, head):
                uris.append(uri)
            elif self.sampling is not None and sniff_video_format(head):
                uris.append(uri)
                self._sniffed_videos.add(uri)
            else:
                self.skipped += 1
        return listing_page(uris)


def _head(uri: str, size: int) -> bytes | None:
    """The first bytes of a file for sniffing, or None when it cannot be read at all.

    ``size`` -1 is the listing's mark of an entry it could not stat (a dangling link, a loop, a
    directory it could not scan). A permission or not-found error is the file's own: None. A
    transient one (a store briefly away) is retried, then raised, as for a listing request.
    """
    if size < 0:
        return None
    if size == 0:
        return b""

    def read() -> bytes:
        fs, path = storage.resolve(uri)
        with fs.open_input_stream(path) as f:
            return f.read(_SNIFF_BYTES)

    try:
        return retry_call(read, storage.retry_policy(), f"sniff {uri}")
    except OSError as exc:
        if is_transient(exc):
            raise
        return None


# --- whole listings, for small inputs ------------------------------------------------------------


def _gather(stream: InputStream, pages: Iterable[pa.Table] | None = None) -> Listing:
    tables = list(pages if pages is not None else stream.pages())
    table = pa.concat_tables(tables) if tables else listing_page([])
    offsets = table.column("offset").to_pylist()
    whole = all(o < 0 for o in offsets)
    return Listing(
        table.column("uri").to_pylist(),
        skipped=stream.skipped,
        duplicates=stream.duplicates,
        offsets=[] if whole else offsets,
        sizes=[] if whole else table.column("size").to_pylist(),
    )


def list_inputs(input_uri: str) -> Listing:
    """The whole streamed listing of an input (manifest, tar shards or folder) as one list.

    For small inputs; the embed stage streams ``InputStream(input_uri).pages()`` instead.
    """
    return _gather(InputStream(input_uri))


def list_images(input_uri: str) -> Listing:
    """Every image under a folder/prefix (recursively), by extension or, failing that, content."""
    stream = InputStream(input_uri)
    # Tar files here are plain files: this lists the images of a folder, whatever is beside them.
    pages = (stream.image_page(files) for files in storage.iter_file_pages(input_uri))
    return _gather(stream, pages)


# --- reading an image ----------------------------------------------------------------------------


def _refuse_directory(uri: str) -> None:
    """Raise IsADirectoryError (a permanent error: a failure row, not a retry) for a local
    directory, such as one the listing could not scan, saying why it was listed."""
    path = storage.resolve(uri)[1]
    if not os.path.isdir(path):
        return
    try:
        with os.scandir(path):
            why = "a directory, not an image file"
    except OSError as exc:
        why = f"a directory that cannot be listed ({type(exc).__name__}: {exc.strerror or exc})"
    raise IsADirectoryError(errno.EISDIR, why, path)


def read_image_bytes(uri: str, offset: int = -1, size: int = -1) -> bytes:
    """The bytes of an image: a whole file, or a tar member's byte range."""
    if offset < 0:
        if not storage.is_remote(uri):
            _refuse_directory(uri)
        return storage.read_bytes(uri)
    tar_uri, _ = tar_member_parts(uri, offset, size)
    fs, path = storage.resolve(tar_uri)
    with fs.open_input_file(path) as f:
        return f.read_at(size, offset)
