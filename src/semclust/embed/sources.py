"""Where images come from: a folder or prefix, a manifest of URIs, or WebDataset-style tar shards.

Every source becomes a ``Listing``: sorted URIs, and for images inside tar shards the byte range
of each member, so a decode task reads a member with one ranged read instead of scanning the tar.
A member's URI is ``<tar URI>#<member name>``.
"""

from __future__ import annotations

import logging
import posixpath
import tarfile
from dataclasses import dataclass, field

import pyarrow as pa

from semclust import storage
from semclust.embed.decode import is_image_candidate

log = logging.getLogger(__name__)

_SNIFF_BYTES = 64
MANIFEST_SUFFIXES = (".parquet", ".csv")
TAR_SUFFIXES = (".tar",)


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


def _is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES) and not storage.is_dir(uri)


def _is_tar(uri: str) -> bool:
    return uri.lower().endswith(TAR_SUFFIXES)


def list_inputs(input_uri: str) -> Listing:
    """Dispatch on the input: a manifest file, tar shard(s), or a folder/prefix of images."""
    storage.check_access(input_uri, must_exist=True)
    if _is_manifest(input_uri):
        return list_manifest(input_uri)
    files = list(storage.list_files(input_uri))
    tars = [(u, s) for u, s in files if _is_tar(u)]
    if tars and len(tars) == len(files):
        return list_tar_shards([u for u, _ in tars])
    if tars:
        log.warning("ignoring %d tar files mixed with loose images under %s", len(tars), input_uri)
    return _images_from_files([(u, s) for u, s in files if not _is_tar(u)])


def _images_from_files(files: list[tuple[str, int]]) -> Listing:
    uris: list[str] = []
    skipped = 0
    for uri, size in files:
        if is_image_candidate(uri):
            uris.append(uri)
            continue
        head = b""
        if size > 0:
            fs, path = storage.resolve(uri)
            with fs.open_input_stream(path) as f:
                head = f.read(_SNIFF_BYTES)
        if is_image_candidate(uri, head):
            uris.append(uri)
        else:
            skipped += 1
    uris.sort()
    return Listing(uris, skipped)


def list_images(input_uri: str) -> Listing:
    """Every image under a folder/prefix (recursively), by extension or, failing that, content."""
    return _images_from_files(list(storage.list_files(input_uri)))


def list_manifest(manifest_uri: str) -> Listing:
    """URIs from the ``uri`` column of a Parquet or CSV manifest (local paths made absolute).

    Every row is listed, whatever its extension: a manifest is the user's explicit choice, and a
    URI that is not an image ends as a failures/ row rather than vanishing.
    """
    if manifest_uri.lower().endswith(".csv"):
        import pyarrow.csv as pacsv

        fs, path = storage.resolve(manifest_uri)
        with fs.open_input_stream(path) as f:
            table = pacsv.read_csv(f)
    else:
        table = storage.read_parquet(manifest_uri)
    if "uri" not in table.column_names:
        raise ValueError(
            f"manifest {manifest_uri!r} needs a 'uri' column; it has {table.column_names}"
        )
    raw = [u for u in table.column("uri").to_pylist() if u]
    base = posixpath.dirname(storage.canonical_uri(manifest_uri))
    canon = {_manifest_uri(u, base) for u in raw}
    skipped = table.num_rows - len(raw)  # empty rows
    return Listing(sorted(canon), skipped=skipped, duplicates=len(raw) - len(canon))


def _manifest_uri(uri: str, base: str) -> str:
    if storage.is_remote(uri) or uri.startswith("file://") or uri.startswith("/"):
        return storage.canonical_uri(uri)
    if storage.is_remote(base):  # relative to a manifest in object storage
        return posixpath.join(base, uri)
    return storage.canonical_uri(posixpath.join(base[len("file://") :], uri))


def list_tar_shards(tar_uris: list[str]) -> Listing:
    """Image members of tar shards with their byte ranges; headers only, data is skipped."""
    rows: list[tuple[str, int, int]] = []
    skipped = 0
    for tar_uri in sorted(tar_uris):
        fs, path = storage.resolve(tar_uri)
        with fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.name.rsplit("/", 1)[-1].startswith(".") or not is_image_candidate(
                    member.name
                ):
                    skipped += 1  # WebDataset side files: .cls, .json, .txt
                    continue
                rows.append((f"{tar_uri}#{member.name}", member.offset_data, member.size))
    rows.sort()
    return Listing(
        [r[0] for r in rows], skipped, offsets=[r[1] for r in rows], sizes=[r[2] for r in rows]
    )


def read_image_bytes(uri: str, offset: int = -1, size: int = -1) -> bytes:
    """The bytes of an image: a whole file, or a tar member's byte range."""
    if offset < 0:
        return storage.read_bytes(uri)
    tar_uri = uri.split("#", 1)[0]
    fs, path = storage.resolve(tar_uri)
    with fs.open_input_file(path) as f:
        return f.read_at(size, offset)
