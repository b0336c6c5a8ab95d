"""One run at a time per run directory: a ``run.lock`` file/object with a heartbeat.

The run whose random token is in ``run.lock`` holds the directory. The lock is created only if
absent (a hard link / ``O_EXCL`` locally; ``PutObject`` with ``If-None-Match: *`` on S3), kept
fresh by a heartbeat thread, and taken over only when stale: no heartbeat for ``stale_seconds``
(the file's mtime, or the object's LastModified against the server's Date), or a holder on this
host whose process is gone (Ctrl-C, SIGKILL), taken over at once. A takeover removes exactly the
version judged stale (rename aside and compare; ``DeleteObject`` with ``If-Match``), so of
several racers one creates the new lock. ``ensure_held()`` (before each commit) reads the lock
and stops a run that lost it. Stores that ignore conditional writes (probed at each acquire) get
a weaker create: write, wait ``SETTLE_SECONDS``, read the token back.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple

from semclust import __version__, storage
from semclust.errors import RunDirLocked

log = logging.getLogger(__name__)
LOCK_NAME = "run.lock"
SETTLE_SECONDS = 1.0  # without conditional writes: wait this long, then read the lock back
_HOST = socket.gethostname()
_NO_ETAG = '"00000000000000000000000000000000"'
_FAILED = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
_ABSENT = ("NoSuchKey", "404", "NotFound")
_UNSUPPORTED = ("NotImplemented", "501")


class _Seen(NamedTuple):
    holder: dict[str, Any]  # {} for a half-written or foreign lock (stale only by age)
    age: float  # seconds since its last write
    tag: Any  # what identifies this version: (inode, mtime, bytes) locally, the ETag on S3


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _parse(data: bytes) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        holder = json.loads(data)
        return holder if isinstance(holder, dict) else {}
    return {}


def _user() -> str:
    with contextlib.suppress(Exception):  # no login name in some containers
        return getpass.getuser()
    return "?"


def _pid_ns() -> str | None:
    """PID namespace: containers that share a host name do not see each other's pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_start(pid: int) -> float | None:
    """Start time (epoch s) of a live process; None if gone or a zombie; -1.0 if unknown."""
    if os.name == "nt":  # os.kill(pid, 0) would send Ctrl-C there
        return -1.0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, StopIteration, IndexError):
        return -1.0
    if fields[0] in ("Z", "X"):
        return None  # killed, not yet reaped by its parent
    return round(btime + int(fields[19]) / os.sysconf("SC_CLK_TCK"), 2)


class _Local:
    def __init__(self, run_dir: str) -> None:
        self.dir = storage.resolve(run_dir)[1]
        self.path = os.path.join(self.dir, LOCK_NAME)

    def _open(self, path: str) -> _Seen:
        with open(path, "rb") as f:
            st, data = os.fstat(f.fileno()), f.read()
        return _Seen(_parse(data), time.time() - st.st_mtime, (st.st_ino, st.st_mtime_ns, data))

    def read(self) -> _Seen | None:
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

    def remove(self, seen: _Seen) -> bool:
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
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


class _S3:
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

    def read(self) -> _Seen | None:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if _code(exc) in _ABSENT:
                return None
            raise
        holder = _parse(resp["Body"].read())
        date = resp["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        if date:  # both times from the server's clock: client skew does not matter
            age = (parsedate_to_datetime(date) - resp["LastModified"]).total_seconds()
        else:
            beat = holder.get("heartbeat_at") or resp["LastModified"].isoformat()
            age = (datetime.now(timezone.utc) - datetime.fromisoformat(beat)).total_seconds()
        return _Seen(holder, age, resp["ETag"])

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
        ours = seen is not None and seen.holder.get("token") == _parse(data).get("token")
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

    def remove(self, seen: _Seen) -> bool:
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


def _store(run_dir: str) -> _Local | _S3:
    if run_dir.startswith("s3://"):
        return _S3(run_dir)
    if storage.is_remote(run_dir):
        raise ValueError(f"run directory locks support local paths and s3:// only: {run_dir}")
    return _Local(run_dir)


def _describe(seen: _Seen) -> str:
    h = seen.holder
    return (
        f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, command "
        f"{h.get('command') or '?'!r}, started {h.get('started_at', '?')}, last heartbeat "
        f"{h.get('heartbeat_at', '?')} ({seen.age:.0f} s ago)"
    )


def read_holder(run_dir: str) -> dict[str, Any] | None:
    """Who holds ``run_dir`` (the lock's JSON), or None when no run holds it."""
    seen = _store(run_dir).read()
    return None if seen is None else seen.holder


def break_lock(run_dir: str) -> dict[str, Any] | None:
    """Remove the lock of a run that is gone; its holder, or None when there was no lock.

    Should that run be alive after all, its next ``ensure_held()`` stops it."""
    store = _store(run_dir)
    for _ in range(5):
        seen = store.read()
        if seen is None:
            return None
        if store.remove(seen):
            log.warning("removed the lock of %s held by %s", run_dir, _describe(seen))
            return seen.holder
    raise RunDirLocked(f"the lock of {run_dir} keeps changing: the run holding it is alive")


class RunDirLock:
    """Hold a run directory for one run: ``with RunDirLock(run_dir, command=...) as lock:``."""

    def __init__(
        self,
        run_dir: str,
        *,
        command: str = "",
        heartbeat_seconds: float = 15.0,
        stale_seconds: float = 90.0,
    ) -> None:
        if not 0 < heartbeat_seconds < stale_seconds:
            raise ValueError(
                f"need 0 < heartbeat_seconds ({heartbeat_seconds}) < "
                f"stale_seconds ({stale_seconds})"
            )
        self.run_dir, self.command = run_dir, command
        self.heartbeat_seconds, self.stale_seconds = heartbeat_seconds, stale_seconds
        self._store = _store(run_dir)
        self._holder: dict[str, Any] = {}
        self._tag: Any = None
        self._held, self._lost = False, None
        self._stop, self._mutex = threading.Event(), threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def holder(self) -> dict[str, Any]:
        """This lock's own record (empty before ``acquire``)."""
        return dict(self._holder)

    def _data(self) -> bytes:
        return (json.dumps(self._holder, indent=1, sort_keys=True) + "\n").encode()

    def _stale(self, seen: _Seen) -> str | None:
        """Why the lock seen may be taken over; None while its run may be alive."""
        if seen.age > self.stale_seconds:
            return f"no heartbeat for {seen.age:.0f} s"
        h, pid = seen.holder, seen.holder.get("pid")
        if h.get("host") != _HOST or h.get("pid_ns") != _pid_ns() or not isinstance(pid, int):
            return None
        start, was = _process_start(pid), h.get("process_start")
        if start is None:
            return f"process {pid} on this host is gone"
        if start >= 0 and isinstance(was, float) and was >= 0 and abs(start - was) > 2:
            return f"pid {pid} on this host is now another process"
        return None

    def acquire(self) -> RunDirLock:
        """Take the run directory, or raise ``RunDirLocked`` naming the run that holds it."""
        if self._held:
            return self
        now, pid, token = _now_iso(), os.getpid(), secrets.token_hex(16)
        self._holder = {
            "host": _HOST,
            "pid": pid,
            "pid_ns": _pid_ns(),
            "process_start": _process_start(pid),
            "user": _user(),
            "command": self.command,
            "token": token,
            "started_at": now,
            "heartbeat_at": now,
            "semclust_version": __version__,
        }
        for _ in range(10):
            seen = self._store.read()
            if seen is None:
                self._tag = self._store.create(self._data())
                if self._tag is None:
                    continue
            elif seen.holder.get("token") == token:  # our own create, whose reply was lost
                self._tag = seen.tag
            else:
                why = self._stale(seen)
                if why is None:
                    wait = max(1, round(self.stale_seconds - seen.age))
                    raise RunDirLocked(
                        f"run directory {self.run_dir} is in use by another run: "
                        f"{_describe(seen)}. If that run is gone, run `semclust unlock --run-dir "
                        f"{self.run_dir}` or wait {wait} s for the lock to go stale"
                    )
                if self._store.remove(seen):
                    log.warning(
                        "took over the lock of %s (%s) from %s", self.run_dir, why, _describe(seen)
                    )
                continue
            self._held, self._lost = True, None
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
            self._thread.start()
            log.info("holding %s (lock token %s)", self.run_dir, token[:8])
            return self
        raise RunDirLocked(f"could not take the lock of {self.run_dir}: it kept changing")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                with self._mutex:
                    if self._stop.is_set():
                        return
                    self._holder["heartbeat_at"] = _now_iso()
                    tag = self._store.rewrite(self._data(), self._holder["token"], self._tag)
                    if tag is None:
                        self._lost = "another process took the lock over or removed it"
                        log.error("lost the lock of %s: %s", self.run_dir, self._lost)
                        return
                    self._tag = tag
            except Exception as exc:  # a store briefly away: try again at the next beat
                log.warning(
                    "heartbeat of the lock of %s failed (%s); retrying in %.0f s",
                    self.run_dir,
                    exc,
                    self.heartbeat_seconds,
                )

    def ensure_held(self) -> None:
        """Raise ``RunDirLocked`` unless this run still holds the lock (call before a commit)."""
        if not self._held:
            raise RunDirLocked(f"the lock of {self.run_dir} is not held by this run")
        try:
            seen = self._store.read()
        except Exception as exc:  # unreadable now: the heartbeat's verdict stands
            log.debug("cannot read the lock of %s: %s", self.run_dir, exc)
        else:
            if seen is None:
                self._lost = "the lock was removed (semclust unlock?)"
            elif seen.holder.get("token") != self._holder["token"]:
                self._lost = f"it was taken over by {_describe(seen)}"
        if self._lost is not None:
            raise RunDirLocked(
                f"lost the lock of {self.run_dir}: {self._lost}. This run stops so that two runs "
                "never write the run directory at once; its committed work is kept"
            )

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours; never raises."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        if not self._mutex.acquire(timeout=10):  # a heartbeat stuck on a store that is away
            log.warning("could not release the lock of %s: the store does not answer", self.run_dir)
            self._held = False
            return
        try:
            if not self._held:
                return
            self._held = False
            seen = self._store.read()
            if seen is not None and seen.holder.get("token") == self._holder["token"]:
                self._store.remove(seen)
        except Exception as exc:
            log.warning(
                "could not remove the lock of %s (%s): if it stays, run `semclust "
                "unlock --run-dir %s`",
                self.run_dir,
                exc,
                self.run_dir,
            )
        finally:
            self._mutex.release()

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
