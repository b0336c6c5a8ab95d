"""Members of tar shards: a member's URI is ``<tar URI>#<member name>`` with its byte range in
the listing row, and ``tar_member_parts`` splits it back (by itself: images and videos both read
members through it)."""

from __future__ import annotations

import tarfile

import pyarrow.fs as pafs

from semclust import storage

TAR_SUFFIXES = (".tar",)


def tar_member_parts(uri: str, offset: int = -1, size: int = -1) -> tuple[str, str]:
    """(tar URI, member name) of a member URI ``<tar URI>#<member name>``.

    Either part may contain ``#``, so the split is at a ``#`` that follows a tar suffix
    (``TAR_SUFFIXES``): the tar's URI ends with one, and a ``#`` inside a name (``a#b.tar``,
    ``x#1.jpg``) does not follow one. Only a tar whose own URI has such a pair inside
    (``x.tar#y.tar``) leaves several candidates: then the member's byte range, which travels
    with its row, decides (see ``_member_evidence``); this costs requests for such names only.
    """
    cuts = [i for i, ch in enumerate(uri) if ch == "#" and uri[:i].lower().endswith(TAR_SUFFIXES)]
    if not cuts:
        raise ValueError(f"{uri!r} is not a tar member URI (<tar URI>#<member name>)")
    cut = cuts[0]
    if len(cuts) > 1:
        files = [i for i in cuts if _is_file(uri[:i])] or cuts
        # max() keeps the first of equals: the shortest tar URI when nothing tells them apart.
        cut = max(files, key=lambda i: _member_evidence(uri[:i], uri[i + 1 :], offset, size))
    return uri[:cut], uri[cut + 1 :]


def _is_file(uri: str) -> bool:
    fs, path = storage.resolve(uri)
    try:
        return fs.get_file_info(path).type == pafs.FileType.File
    except OSError:
        return False


def _member_evidence(tar_uri: str, member: str, offset: int, size: int) -> int:
    """How well the 512 bytes before ``offset`` in the tar match the member: tar puts a member's
    header block right before its data. 2: a valid header (checksum) for ``size`` bytes naming
    the member; 1: for ``size`` bytes (a long or non-ASCII name is not in that block in full);
    0: no such header."""
    if offset < tarfile.BLOCKSIZE or size < 0:
        return 0
    fs, path = storage.resolve(tar_uri)
    try:
        with fs.open_input_file(path) as f:
            block = f.read_at(tarfile.BLOCKSIZE, offset - tarfile.BLOCKSIZE)
        header = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except (OSError, tarfile.TarError):
        return 0
    if header.size != size:
        return 0
    return 2 if header.name == member else 1
