"""URIs and local paths: splitting by hand (never urllib), canonical forms, joins, image ids."""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from typing import TypeVar

T = TypeVar("T")

_ID_MASK = (1 << 63) - 1


def image_id_for(uri: str) -> int:
    """Stable 63-bit id of a URI (BLAKE2b): equal across runs and machines, a valid FAISS id."""
    digest = hashlib.blake2b(uri.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _ID_MASK


# --- URIs -----------------------------------------------------------------------------------
#
# The URI form written to a run directory: ``file://`` + the absolute local path, and
# ``s3://bucket/`` (or ``gs://bucket/``) + the object key, both raw: never percent-encoded or
# -decoded, so every byte a filesystem or a key allows (``#``, ``?``, ``%``, ``+``, spaces,
# unicode, a literal ``%20``) round-trips and ``image_id_for`` hashes exactly the name. URIs are
# therefore split by hand at the scheme's ``://``, never with urllib, which would take ``#`` for a
# fragment, ``?`` for a query and ``:`` in a file name for a scheme.

REMOTE_SCHEMES = ("s3", "gs", "gcs")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def split_uri(uri: str) -> tuple[str, str]:
    """(lower-case scheme, the rest after ``://``), or ``("", uri)`` for a plain local path.

    Only a leading ``<letters>://`` is a scheme: a local name such as ``photo:1.jpg`` or
    ``a#b?.jpg`` stays a path.
    """
    m = _SCHEME.match(uri)
    if m is None:
        return "", uri
    return m.group(1).lower(), uri[m.end() :]


def is_remote(uri: str) -> bool:
    return split_uri(uri)[0] in REMOTE_SCHEMES


def _local_path(path_or_uri: str) -> str:
    """The absolute, symlink-resolved local path of a local path or ``file://`` URI."""
    scheme, rest = split_uri(path_or_uri)
    if scheme == "file":
        if rest.startswith("localhost/"):  # file://localhost/abs is file:///abs (RFC 8089)
            rest = rest[len("localhost") :]
        if not rest.startswith("/"):
            raise ValueError(
                f"file URI {path_or_uri!r} names a host or a relative path; write "
                "file:///absolute/path (raw, not percent-encoded) or a plain path"
            )
        path = rest
    elif scheme:
        raise ValueError(
            f"unsupported URI scheme {scheme!r} in {path_or_uri!r}; use a local path, "
            "file://, or s3://"
        )
    elif path_or_uri[:6].lower() == "file:/":  # file:/abs, RFC 8089's form without authority
        path = path_or_uri[5:]
    else:
        path = os.path.expanduser(path_or_uri)
    # os.path.realpath is what Path.resolve() did (same result, so the same image ids), except
    # that a symlink loop comes back as the path itself instead of raising RuntimeError: the read
    # then fails with ELOOP, which is that image's failure row.
    return os.path.realpath(path)


def canonical_uri(path_or_uri: str) -> str:
    """``file:///abs/path`` for local paths (symlinks resolved), the URI itself for object storage
    (without a trailing ``/``). Nothing is percent-decoded: ``a%20b`` names a file ``a%20b``."""
    if is_remote(path_or_uri):
        return path_or_uri.rstrip("/") if path_or_uri.endswith("/") else path_or_uri
    return "file://" + _local_path(path_or_uri)


def join(base: str, *parts: str) -> str:
    if is_remote(base) or base.startswith("file://"):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)
