"""URIs -> filesystems, and the few file operations the stages need.

Every stage addresses data by URI: a local path, ``file://...`` or ``s3://bucket/key``. Local
writes go to a temporary name and are renamed when whole; an S3 PUT is atomic by itself, so a
reader never sees half a shard on either.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

_ID_MASK = (1 << 63) - 1


def image_id_for(uri: str) -> int:
    """Stable 63-bit id of a URI (BLAKE2b): equal across runs and machines, a valid FAISS id."""
    digest = hashlib.blake2b(uri.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _ID_MASK


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in ("s3", "gs", "gcs")


def canonical_uri(path_or_uri: str) -> str:
    """``file:///abs/path`` for local paths, the URI itself for object storage."""
    parsed = urlparse(path_or_uri)
    if parsed.scheme in ("s3", "gs", "gcs"):
        return path_or_uri.rstrip("/") if path_or_uri.endswith("/") else path_or_uri
    if parsed.scheme == "file":
        path_or_uri = parsed.path
    elif parsed.scheme:
        raise ValueError(
            f"unsupported URI scheme {parsed.scheme!r} in {path_or_uri!r}; use a local path, "
            "file://, or s3://"
        )
    return "file://" + str(Path(path_or_uri).expanduser().resolve())


def _s3_filesystem() -> pafs.FileSystem:
    # The standard AWS variables (and AWS_ENDPOINT_URL for S3-compatible stores) configure it.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs["region"] = region or "us-east-1"
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for a URI or local path."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return _s3_filesystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    return pafs.LocalFileSystem(), canonical_uri(uri)[len("file://") :]


def join(base: str, *parts: str) -> str:
    if is_remote(base) or base.startswith("file://"):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def _tmp_name(path: str) -> str:
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".tmp-{uuid.uuid4().hex[:12]}-{tail}")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file so that readers see either the old file or the new one."""
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = _tmp_name(path)
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_parquet(uri: str, table: pa.Table) -> None:
    """Write a Parquet shard atomically (temporary name + rename locally; one PUT on S3)."""
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = _tmp_name(path)
        pq.write_table(table, tmp, filesystem=fs)
        os.replace(tmp, path)
    else:
        pq.write_table(table, path, filesystem=fs)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def parquet_num_rows(uri: str) -> int:
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def list_files(uri: str, *, recursive: bool = True) -> Iterator[tuple[str, int]]:
    """(URI, size) of every file under a folder/prefix, hidden names (``.x``) skipped."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        yield _to_uri(uri, info.path), info.size
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
    scheme = urlparse(base_uri).scheme
    if scheme in ("s3", "gs", "gcs"):
        return f"{scheme}://{fs_path}"
    return "file://" + fs_path


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


def remove_tree(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)
