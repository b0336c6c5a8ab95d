"""Where ``run.lock`` lives: a local file (hard link / ``O_EXCL`` create, rename-aside removal) or
an S3 object (``If-None-Match`` create, ``If-Match`` rewrite and delete), behind one interface
of read / create / rewrite / remove used by ``semclust.lock``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple

from semclust import storage

log = logging.getLogger(__name__)
LOCK_NAME = "run.lock"
SETTLE_SECONDS = 1.0  # without conditional writes: wait this long, then read the lock back
_NO_ETAG = '"00000000000000000000000000000000"'
_FAILED = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
_ABSENT = ("NoSuchKey", "404", "NotFound")
_UNSUPPORTED = ("NotImplemented", "501")


class Seen(NamedTuple):
    holder: dict[str, Any]  # {} for a half-written or foreign lock (stale only by age)
    age: float  # seconds since its last write
    tag: Any  # what identifies this version: (inode, mtime, bytes) locally, the ETag on S3


class LocalStore:
    def __init__(self, run_dir: str) -> None:
        self.dir = storage.resolve(run_dir)[1]
        self.path = os.path.join(self.dir, LOCK_NAME)

    def _open(self, path: str) -> Seen:
        with open(path, "rb") as f:
            st, data = os.fstat(f.fileno()), f.read()
        return Seen(parse(data), time.time() - st.st_mtime, (st.st_ino, st.st_mtime_ns, data))

    def read(self) -> Seen | None:
        try:
            return self._open(self.path)
        except FileNotFoundError:
            return None

    def _temp(self, data: bytes) -> str:
        tmp = os.path.join(self.dir, f".{LOCK_NAME}.{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        return tmp

    def create(self, data: bytes) -> Any:
        storage.makedirs(self.dir)
        tmp = self._temp(data)
        try:
            os.link(tmp, self.path)  # the whole content at once; fails if the lock exists
        except FileExistsError:
            return None
        except OSError:  # no hard links (some network/FUSE filesystems)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        finally:
            os.unlink(tmp)
        return True

    def rewrite(self, data: bytes, token: str, tag: Any) -> Any:
        seen = self.read()
        if seen is None or seen.holder.get("token") != token:
            return None
        os.replace(self._temp(data), self.path)
        return True

    def remove(self, seen: Seen) -> bool:
        """Remove exactly the version seen: rename it aside, compare, give it back if not."""
        aside = os.path.join(self.dir, f".{LOCK_NAME}.gone-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True
        same = self._open(aside).tag == seen.tag
        if not same:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        os.unlink(aside)
        return same


def _code(exc: Exception) -> str:
    # Errors without an answer (a refused connection) carry ``response=None``.
    return str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", ""))


class S3Store:
    def __init__(self, run_dir: str) -> None:
        self.bucket, _, prefix = storage.resolve(run_dir)[1].partition("/")
        self.key = f"{prefix}/{LOCK_NAME}" if prefix else LOCK_NAME
        self.client = storage.s3_list_client()
        self.conditional: bool | None = None  # honours If-None-Match / If-Match? (probed)

    def _weak(self) -> None:
        if self.conditional is not False:
            log.warning(
                "s3://%s has no conditional writes: the run lock is weaker (write, wait "
                "%.0f s, read back)",
                self.bucket,
                SETTLE_SECONDS,
            )
        self.conditional = False

    def read(self) -> Seen | None:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if _code(exc) in _ABSENT:
                return None
            raise
        holder = parse(resp["Body"].read())
        date = resp["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        if date:  # both times from the server's clock: client skew does not matter
            age = (parsedate_to_datetime(date) - resp["LastModified"]).total_seconds()
        else:
            beat = holder.get("heartbeat_at") or resp["LastModified"].isoformat()
            age = (datetime.now(timezone.utc) - datetime.fromisoformat(beat)).total_seconds()
        return Seen(holder, age, resp["ETag"])

    def _put(self, data: bytes, **cond: str) -> str | None:
        """The new ETag; None when a condition failed, or is not supported (then weak)."""
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **cond)
            return resp["ETag"]
        except Exception as exc:
            if cond and _code(exc) in _UNSUPPORTED:
                self._weak()
            elif _code(exc) not in _FAILED:
                raise
        return None

    def create(self, data: bytes) -> Any:
        etag = None
        if self.conditional is not False:
            etag = self._put(data, IfNoneMatch="*")
            if etag is None and self.conditional is not False:
                return None  # it exists: another run created it first
            if etag is not None and self.conditional is None:
                # Probe once: a store that honours conditions refuses both (else: same bytes).
                refused = (
                    self._put(data, IfNoneMatch="*") is None
                    and self._put(data, IfMatch=_NO_ETAG) is None
                )
                if refused and self.conditional is None:  # None: no "not implemented" either
                    self.conditional = True
                else:
                    self._weak()
            if self.conditional:
                return etag
        if etag is None:
            self._put(data)
        time.sleep(SETTLE_SECONDS)  # of writers racing, the last one wins; each reads back
        seen = self.read()
        ours = seen is not None and seen.holder.get("token") == parse(data).get("token")
        return seen.tag if ours else None

    def rewrite(self, data: bytes, token: str, tag: Any) -> Any:
        if self.conditional is not False:
            etag = self._put(data, IfMatch=tag)
            if etag is not None:
                return etag
        seen = self.read()  # a lost reply may have moved the ETag; or a store without If-Match
        if seen is None or seen.holder.get("token") != token:
            return None
        return self._put(data) if self.conditional is False else self._put(data, IfMatch=seen.tag)

    def remove(self, seen: Seen) -> bool:
        if self.conditional is False:
            now = self.read()
            if now is None or now.tag != seen.tag:
                return now is None
        cond = {} if self.conditional is False else {"IfMatch": seen.tag}
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, **cond)
        except Exception as exc:
            if cond and _code(exc) in _UNSUPPORTED:
                self._weak()
                return self.remove(seen)
            if _code(exc) in _FAILED:  # changed meanwhile, or (SeaweedFS) already gone
                return self.read() is None
            if _code(exc) not in _ABSENT:
                raise
        return True


def store_for(run_dir: str) -> LocalStore | S3Store:
    if run_dir.startswith("s3://"):
        return S3Store(run_dir)
    if storage.is_remote(run_dir):
        raise ValueError(f"run directory locks support local paths and s3:// only: {run_dir}")
    return LocalStore(run_dir)


def parse(data: bytes) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        holder = json.loads(data)
        return holder if isinstance(holder, dict) else {}
    return {}
