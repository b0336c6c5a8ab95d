"""Weights files in object storage: fetched once per node into a local cache, then checked.

Air-gapped GPU clusters cannot use Keras' download; they stage the weights file in their own
bucket and pass its URI as ``embed.weights``.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from pathlib import Path

from semclust import storage

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(storage.cache_root()) / "weights"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def local_weights(weights: str, sha256: str | None = None) -> str:
    """A local path for ``weights``: unchanged unless it is an object-storage URI.

    A remote file is downloaded once per node (a file lock keeps concurrent actors from fetching
    it twice), kept under its URI's hash with its own name (the suffix tells Keras the format),
    and checked against the remote size, or against ``sha256`` when given.
    """
    if not storage.is_remote(weights):
        return weights
    fs, path = storage.resolve(weights)
    info = fs.get_file_info(path)
    if info.type.name != "File":
        raise FileNotFoundError(f"weights file {weights!r} does not exist")
    key = hashlib.blake2b(weights.encode(), digest_size=8).hexdigest()
    target = cache_dir() / f"{key}-{posixpath_basename(weights)}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(target.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target.is_file() and _valid(target, info.size, sha256)):
            log.info("fetching weights %s into %s", weights, target)
            tmp = target.with_name(target.name + ".part")
            with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
                while block := src.read(8 << 20):
                    dst.write(block)
            if not _valid(tmp, info.size, sha256):
                tmp.unlink(missing_ok=True)
                raise ValueError(
                    f"weights {weights!r} failed their check after download "
                    f"({'sha256' if sha256 else 'size'} mismatch)"
                )
            os.replace(tmp, target)
    return str(target)


def _valid(path: Path, size: int, sha256: str | None) -> bool:
    if path.stat().st_size != size:
        return False
    return sha256 is None or _sha256(path) == sha256.lower()


def posixpath_basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]
