"""Writing the report's files, locally or to object storage, with a Content-Type."""

from __future__ import annotations

import posixpath

import pyarrow.fs as pafs

from semclust import storage

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".json": "application/json",
}


def write_file(uri: str, data: bytes) -> None:
    """Write a whole file; on object storage also set its Content-Type from the extension.

    Served from a bucket (static website hosting, a CDN), a page without ``text/html`` would be
    downloaded instead of shown; local files need no type.
    """
    fs, path = storage.resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        storage.write_bytes(uri, data)
        return
    ext = posixpath.splitext(path)[1].lower()
    metadata = {"Content-Type": CONTENT_TYPES.get(ext, "application/octet-stream")}
    with fs.open_output_stream(path, metadata=metadata) as f:
        f.write(data)
