"""Access checks with messages that say what to fix, secrets kept out of every message."""

from __future__ import annotations

import os
from typing import TypeVar

import pyarrow.fs as pafs

from semclust.storage.settings import (
    resolve,
)
from semclust.storage.uris import (
    is_remote,
)

T = TypeVar("T")

_ACCESS_HINTS = (
    ("SIGNATURE_DOES_NOT_MATCH", "the secret key is wrong"),
    ("SignatureDoesNotMatch", "the secret key is wrong"),
    ("INVALID_ACCESS_KEY_ID", "the access key id is unknown"),
    ("InvalidAccessKeyId", "the access key id is unknown"),
    ("ACCESS_DENIED", "access is denied"),
    ("AccessDenied", "access is denied"),
    ("NO_SUCH_BUCKET", "the bucket does not exist"),
    ("NoSuchBucket", "the bucket does not exist"),
)


def explain_access_error(uri: str, exc: BaseException) -> ValueError:
    """A clear, credential-free error for a failed object-storage access."""
    text = str(exc)
    reason = next((hint for code, hint in _ACCESS_HINTS if code in text), None)
    if reason is None:
        reason = f"{type(exc).__name__}: {redact(text)}"
    return ValueError(
        f"cannot access {uri}: {reason}. Check the credentials (AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role) and the endpoint/region settings"
    )


def redact(text: str) -> str:
    """Remove any credential of the current AWS chain from a message."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def check_access(uri: str, *, must_exist: bool) -> None:
    """Fail at once, with a clear message, when a location cannot be reached.

    For object storage the bucket must exist and the credentials must be accepted; with
    ``must_exist`` the URI itself must exist too (an input), otherwise it may be created (a run
    directory).
    """
    fs, path = resolve(uri)
    try:
        # One cheap request; a wrong key or a missing permission fails it with a 403.
        info = fs.get_file_info(path)
        if is_remote(uri) and info.type == pafs.FileType.NotFound:
            bucket = path.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise ValueError(f"cannot access {uri}: bucket {bucket!r} does not exist")
    except ValueError:
        raise
    except OSError as exc:
        raise explain_access_error(uri, exc) from None
    if must_exist and info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri!r} does not exist")


_BUCKET_CHECKS: dict[str, tuple[float, bool]] = {}  # bucket -> (when, reachable)


def bucket_reachable(uri: str, max_age: float = 10.0) -> bool:
    """Whether this process's credentials can still reach the bucket of ``uri`` (answers are
    kept ``max_age`` seconds): after a 403 on an object, it tells a denied object (the bucket
    answers) from wrong or expired credentials (it does not)."""
    import time

    fs, path = resolve(uri)
    bucket = path.split("/", 1)[0]
    now = time.monotonic()
    cached = _BUCKET_CHECKS.get(bucket)
    if cached is not None and now - cached[0] < max_age:
        return cached[1]
    try:
        reachable = fs.get_file_info(bucket).type == pafs.FileType.Directory
    except OSError:
        reachable = False
    # The answer's age counts from when it came: a probe of a store that is down can take
    # seconds of the client's own retries.
    _BUCKET_CHECKS[bucket] = (time.monotonic(), reachable)
    return reachable
