"""Transient or permanent: the line between a store that is briefly away and a bad object.

A read or write of object storage (or of a network disk) that fails for a reason outside the
object — connection refused or reset, a timeout, throttling, a 5xx, an unknown error — is
*transient*: it is retried with backoff for up to ``RetryPolicy.seconds``, and what still fails
is left for ``--mode resume``, never written as a ``failures/`` row. Only properties of the
object are *permanent*: it does not exist (404 after listing, ENOENT, a dangling link), access to
that object is denied (403, EACCES), it is a directory, a symlink loop, a range past its end.
The clients' own retries (botocore's retry modes, pyarrow's S3 retry strategy) run inside each
attempt; this module adds the time budget that neither client has, so an outage of a minute is
ridden out instead of giving up after a few hundred milliseconds of backoff.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# errno values that describe the object, not the path to it.
_PERMANENT_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.ELOOP,
        errno.ENAMETOOLONG,
        errno.EINVAL,
        errno.ENOSPC,  # a full disk does not clear by waiting; the run stops with a message
        errno.EDQUOT,
        errno.EROFS,
        errno.EFBIG,
    }
)
# Error codes in pyarrow's messages that describe the object. A wrong or expired credential or a
# missing bucket is not among them: it concerns every object, and writing each image as a failure
# would lose the run; the run stops instead, and the resume goes on once it is fixed.
_PERMANENT_CODES = (
    "ACCESS_DENIED",
    "AccessDenied",
    "NO_SUCH_KEY",
    "NoSuchKey",
    "RESOURCE_NOT_FOUND",
    "Path does not exist",
    "INVALID_RANGE",
    "InvalidRange",
    "InvalidObjectState",
    "not a directory",
    "is a directory",
)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may go away on its own (retry, then leave for the resume).

    Unknown errors of a store count as transient: writing a failure row for a healthy image
    loses it for good, while a permanent error that is retried costs only time and ends the run
    with a message.
    """
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # botocore comes with s3fs; without it, only OSErrors occur
        BotoCoreError = ClientError = ()  # type: ignore[assignment,misc]
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        # Only the object's own codes are permanent; throttling, 5xx, expired tokens are not.
        return code not in ("NoSuchKey", "404", "NotFound", "AccessDenied", "403", "InvalidRange")
    if isinstance(exc, BotoCoreError):
        name = type(exc).__name__
        return any(word in name for word in ("Connection", "Timeout", "Endpoint", "Proxy"))
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, OSError):
        if exc.errno in _PERMANENT_ERRNOS:
            return False
        text = str(exc).lower()
        return not any(code.lower() in text for code in _PERMANENT_CODES)
    return False


def is_denied(exc: BaseException) -> bool:
    """A 403 / EACCES. On S3 a HEAD cannot say whether that one object is denied or the
    credentials are wrong or expired for all of them; the caller asks the bucket to tell."""
    if isinstance(exc, PermissionError):
        return True
    if isinstance(exc, OSError):
        return "ACCESS_DENIED" in str(exc) or "AccessDenied" in str(exc)
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying a transient failure: ``seconds`` in all, backoff doubling from
    ``first_delay`` up to ``max_delay`` (with jitter, so many readers do not retry in step)."""

    seconds: float = 120.0
    first_delay: float = 0.25
    max_delay: float = 8.0

    def __post_init__(self) -> None:
        if self.seconds < 0:
            raise ValueError(f"storage.retry_seconds must be >= 0, got {self.seconds}")


_CREDENTIAL_CODES = frozenset(
    {
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "InvalidToken",
        "ExpiredToken",
        "NoSuchBucket",
        "AccessDenied",
        "AllAccessDisabled",
    }
)


def is_transient_request(exc: BaseException) -> bool:
    """``is_transient`` for a request about the whole input or run (a listing, not one image):
    wrong credentials or a missing bucket are then the user's to fix, at once."""
    from botocore.exceptions import ClientError

    code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
    return code not in _CREDENTIAL_CODES and is_transient(exc)


def retry_call(
    fn: Callable[[], T],
    policy: RetryPolicy,
    what: str,
    transient: Callable[[BaseException], bool] = is_transient,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``fn()``, retried while it raises a ``transient`` error and the budget lasts.

    The last error is re-raised as it was when the budget runs out, or at once when it is
    permanent; ``what`` names the operation in the log.
    """
    deadline = clock() + policy.seconds
    delay = policy.first_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not transient(exc):
                raise
            left = deadline - clock()
            if left <= 0:
                log.warning("%s: giving up after %d attempts: %s", what, attempt, exc)
                raise
            pause = min(delay * (0.5 + random.random()), left, policy.max_delay)
            if attempt == 1 or attempt % 5 == 0:
                log.warning("%s failed (%s); retrying for up to %.0f s", what, exc, left)
            time.sleep(pause)
            delay = min(delay * 2, policy.max_delay)
