"""Reads and writes of whole objects and files, each retried on transient errors; atomic writes
(temp + rename locally, one PUT on S3)."""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from semclust.storage.settings import (
    _retrying,
    resolve,
)

T = TypeVar("T")


@_retrying("check")
def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


@_retrying("check")
def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


@_retrying("create")
def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


@_retrying("read")
def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def cache_root() -> str:
    """semclust's local cache on this node: ``SEMCLUST_CACHE``, else ``~/.cache/semclust`` (or
    under ``XDG_CACHE_HOME``); weights fetched from object storage live in ``weights/``, the
    copies ``local_copy`` makes in ``files/``."""
    return os.environ.get("SEMCLUST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "semclust"
    )


@_retrying("download")
def local_copy(uri: str, chunk: int = 64 << 20) -> str:
    """A local path holding the bytes of ``uri``, for a file that is memory-mapped rather than
    read (an index, its re-rank vectors): a local ``uri``'s own path; a remote one's copy in
    ``cache_root()/files``, downloaded in chunks (never whole in memory) once per version of the
    object (its name, size and modification time), so later searches map it at once."""
    import hashlib
    import tempfile

    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{uri}: no such object")
    name = hashlib.blake2b(uri.encode(), digest_size=8).hexdigest()
    version = hashlib.blake2b(f"{info.size}\n{info.mtime_ns}".encode(), digest_size=6).hexdigest()
    folder = os.path.join(cache_root(), "files")
    target = os.path.join(folder, f"{name}-{version}-{posixpath.basename(path)}")
    if os.path.exists(target) and os.path.getsize(target) == info.size:
        return target
    os.makedirs(folder, exist_ok=True)
    for old in os.listdir(folder):  # earlier versions of this object: rewritten since
        if old.startswith(f"{name}-") and not old.endswith(".part"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, old))  # a process mapping it keeps its pages
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as dst, fs.open_input_stream(path) as src:
            while block := src.read(chunk):
                dst.write(block)
        os.replace(tmp, target)  # whole or not at all: a second process may race us here
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return target


def _tmp_name(path: str) -> str:
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".tmp-{uuid.uuid4().hex[:12]}-{tail}")


@contextlib.contextmanager
def _temporary(path: str) -> Iterator[str]:
    """A temporary name beside ``path``, removed if the write fails (a full disk keeps no
    half-written file)."""
    tmp = _tmp_name(path)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@_retrying("write")
def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file so that readers see either the old file or the new one."""
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        with _temporary(path) as tmp:
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


@_retrying("write")
def upload_file(local_path: str, uri: str, chunk: int = 64 << 20) -> None:
    """Copy a local file to ``uri`` in chunks (a file larger than memory is never read whole);
    a local ``uri`` gets it atomically, by rename when possible."""
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        with _temporary(path) as tmp:
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, path)
        return
    with open(local_path, "rb") as src, fs.open_output_stream(path) as dst:
        while block := src.read(chunk):
            dst.write(block)


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


@_retrying("write")
def write_parquet(uri: str, table: pa.Table) -> None:
    """Write a Parquet shard atomically (temporary name + rename locally; one PUT on S3)."""
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        with _temporary(path) as tmp:
            pq.write_table(table, tmp, filesystem=fs)
            os.replace(tmp, path)
    else:
        pq.write_table(table, path, filesystem=fs)


@_retrying("read")
def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


@_retrying("read")
def parquet_num_rows(uri: str) -> int:
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


@_retrying("remove")
def remove_tree(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)
