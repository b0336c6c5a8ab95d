"""Listing folders and prefixes page by page, in sorted order, without holding the listing:
S3 ListObjectsV2 pages, local trees directory by directory (symlinks followed once per real
directory)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from semclust.errors import StoreUnavailable
from semclust.retry import is_transient_request, retry_call
from semclust.storage.access import (
    explain_access_error,
    redact,
)
from semclust.storage.settings import (
    _retrying,
    resolve,
    retry_policy,
    s3_list_client,
)
from semclust.storage.uris import (
    REMOTE_SCHEMES,
    join,
    split_uri,
)

T = TypeVar("T")


def list_files(uri: str, *, recursive: bool = True) -> Iterator[tuple[str, int]]:
    """(URI, size) of every file under a folder/prefix, hidden names (``.x``) skipped.

    A local tree is walked as ``iter_file_pages`` walks it (symlinks followed, loops cut,
    broken entries listed with size -1; see ``_walk_sorted``), in sorted order.
    """
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        yield _to_uri(uri, info.path), info.size
        return
    if isinstance(fs, pafs.LocalFileSystem):
        # pyarrow's own recursive listing follows directory symlinks without cutting loops and
        # fails on a name that is not UTF-8: the walk handles both.
        for entry_path, size in _walk_sorted(path, recursive=recursive):
            yield "file://" + entry_path, size
        return
    selector = pafs.FileSelector(path, recursive=recursive)
    for entry in fs.get_file_info(selector):
        if entry.type != pafs.FileType.File:
            continue
        rel = entry.path[len(path) :].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        yield _to_uri(uri, entry.path), entry.size


def _to_uri(base_uri: str, fs_path: str) -> str:
    """The URI of a path that the filesystem of ``base_uri`` returned (raw, as everywhere)."""
    scheme = split_uri(base_uri)[0]
    if scheme in REMOTE_SCHEMES:
        return f"{scheme}://{fs_path}"
    return "file://" + fs_path


@_retrying("list")
def list_shards(dir_uri: str) -> list[str]:
    """Committed ``part-*.parquet`` shards of a run-directory folder, sorted by name."""
    fs, path = resolve(dir_uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    names = [
        e.base_name
        for e in fs.get_file_info(pafs.FileSelector(path))
        if e.type == pafs.FileType.File
        and e.base_name.startswith("part-")
        and e.base_name.endswith(".parquet")
    ]
    return [join(dir_uri, n) for n in sorted(names)]


# --- paginated listing ---------------------------------------------------------------------------

LIST_PAGE_SIZE = 1000  # S3's own maximum keys per ListObjectsV2 page
_PAGE_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64())])


def _file_page(rows: list[tuple[str, int]]) -> pa.Table:
    uris, sizes = zip(*rows, strict=True) if rows else ((), ())
    return pa.table(
        {"uri": pa.array(uris, pa.string()), "size": pa.array(sizes, pa.int64())},
        schema=_PAGE_SCHEMA,
    )


def iter_file_pages(
    uri: str, *, page_size: int = LIST_PAGE_SIZE, s3_client: Any = None
) -> Iterator[pa.Table]:
    """Pages (``uri``, ``size``) of the files under a folder/prefix, in sorted URI order, lazily.

    The same files and order as ``sorted(list_files(uri))`` (hidden names skipped), without
    holding the whole listing: S3 is paged with ListObjectsV2 (keys come back in binary order,
    which is the order of Python strings), a local tree is walked one directory at a time
    (``_walk_sorted``: symlinks, loops and broken entries). A single directory's entries are held
    while it is walked (the OS returns them unsorted); gs:// falls back to pyarrow's full
    listing. Pages may be shorter than ``page_size``.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    fs, path = resolve(uri)
    scheme = split_uri(uri)[0]
    if scheme == "s3" or isinstance(fs, pafs.LocalFileSystem):
        try:
            info = fs.get_file_info(path)
        except OSError as exc:
            raise explain_access_error(uri, exc) from None
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input {uri!r} does not exist")
        if info.type == pafs.FileType.File:
            yield _file_page([(_to_uri(uri, info.path), info.size)])
            return
        rows = _iter_s3_files(uri, path, page_size, s3_client) if scheme == "s3" else None
        if rows is None:
            rows = (("file://" + p, s) for p, s in _walk_sorted(path))
    else:
        rows = iter(sorted(list_files(uri)))
    page: list[tuple[str, int]] = []
    for row in rows:
        page.append(row)
        if len(page) >= page_size:
            yield _file_page(page)
            page = []
    if page:
        yield _file_page(page)


def _walk_sorted(root: str, *, recursive: bool = True) -> Iterator[tuple[str, int]]:
    """(path, size) of files under ``root`` in the order of their sorted full paths.

    A directory sorts by ``name + "/"``: every path below it starts with that, so walking
    entries in this order gives exactly the global string order, one directory at a time.

    Folders as users have them:

    - A symlink to a file is listed under its own name (a folder of links into an image pool is
      a common way to build a dataset).
    - A directory symlink is followed, but each real directory (``st_dev``, ``st_ino``) is
      walked at most once, so loops end and two links to one directory list it once (under the
      link that sorts first). A link to a directory inside the root (not under a hidden name)
      is not followed: the plain walk lists its files once, at their real paths.
    - An entry that cannot be stat'ed (a dangling link, a link loop) is listed with size -1, and
      a directory that cannot be scanned is listed as ``path + "/"`` with size -1: reading either
      fails, so it becomes a failure row instead of vanishing or ending the listing.
    - FIFOs, sockets and devices are not files and are skipped (opening a FIFO blocks a reader).
    - A name that is not UTF-8 cannot be a URI (run directories store URIs as UTF-8 text): it is
      listed with its bad bytes as ``\\xNN`` escapes, which names no file, so it fails at read.
    """
    root_real = os.path.realpath(root)
    top = os.stat(root)
    visited = {(top.st_dev, top.st_ino)}
    yield from _walk_entries(_scan_dir(root), root_real, visited, recursive)


# A directory entry: (sort key, path, size, (st_dev, st_ino) for a directory else None, is_link).
_Entry = tuple[str, str, int, tuple[int, int] | None, bool]


def _scan_dir(path: str) -> list[_Entry]:
    """The visible entries of one directory, sorted; raises OSError if it cannot be scanned.

    The sort key is the name as it will appear in the URI (``_text_path``), so that the URIs
    come out sorted even where a name had to be escaped.
    """
    entries: list[_Entry] = []
    with os.scandir(path) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            key = _text_path(entry.name)
            try:
                st = entry.stat()  # follows symlinks
            except OSError:  # dangling link, link loop, no search permission
                entries.append((key, entry.path, -1, None, True))
                continue
            if stat.S_ISDIR(st.st_mode):
                dir_id = (st.st_dev, st.st_ino)
                entries.append((key + "/", entry.path, -1, dir_id, entry.is_symlink()))
            elif stat.S_ISREG(st.st_mode):
                entries.append((key, entry.path, st.st_size, None, False))
    entries.sort()
    return entries


def _walk_entries(
    entries: list[_Entry], root_real: str, visited: set[tuple[int, int]], recursive: bool
) -> Iterator[tuple[str, int]]:
    for _, entry_path, size, dir_id, is_link in entries:
        if dir_id is None:
            yield _text_path(entry_path), size
            continue
        if not recursive or dir_id in visited:
            continue  # a loop, or a second way to a directory already walked
        if is_link and _visible_inside(os.path.realpath(entry_path), root_real):
            continue  # walked (or to be walked) at its real path
        visited.add(dir_id)
        try:
            sub = _scan_dir(entry_path)
        except OSError:
            yield _text_path(entry_path) + "/", -1
            continue
        yield from _walk_entries(sub, root_real, visited, recursive)


def _visible_inside(real: str, root_real: str) -> bool:
    """Whether the real path ``real`` is the root or below it with no hidden component (so the
    plain walk from the root reaches it)."""
    if real == root_real:
        return True
    prefix = root_real.rstrip("/") + "/"
    if not real.startswith(prefix):
        return False
    return not any(part.startswith(".") for part in real[len(prefix) :].split("/"))


def _text_path(path: str) -> str:
    """``path`` as UTF-8-clean text: undecodable bytes (surrogate escapes) become ``\\xNN``."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return path


def _iter_s3_files(uri: str, path: str, page_size: int, client: Any) -> Iterator[tuple[str, int]]:
    """(URI, size) of the objects under an S3 prefix, one ListObjectsV2 request per page."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = client or s3_list_client()
    bucket, _, key = path.partition("/")
    prefix = f"{key}/" if key else ""
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
        if token:
            kwargs["ContinuationToken"] = token
        try:
            resp = retry_call(
                lambda kw=kwargs: client.list_objects_v2(**kw),
                retry_policy(),
                f"list {uri}",
                transient=is_transient_request,
            )
        except (BotoCoreError, ClientError) as exc:
            if is_transient_request(exc):
                raise StoreUnavailable(
                    f"cannot list {uri}: the store was unreachable for longer than "
                    f"storage.retry_seconds={retry_policy().seconds:g} s ({redact(str(exc))}); "
                    "nothing was lost: run again (--mode resume) once it is back"
                ) from None
            raise explain_access_error(uri, exc) from None
        for obj in resp.get("Contents", []):
            name = obj["Key"]
            rel = name[len(prefix) :]
            if name.endswith("/") or any(p.startswith(".") for p in rel.split("/")):
                continue  # folder markers and hidden names, as pyarrow's listing
            yield f"s3://{bucket}/{name}", int(obj["Size"])
        token = resp.get("NextContinuationToken")
        if not resp.get("IsTruncated") or not token:
            return
