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
from datetime import datetime, timezone
from typing import Any

from semclust import __version__, storage
from semclust.errors import RunDirLocked
from semclust.lockstore import Seen, store_for

log = logging.getLogger(__name__)
_HOST = socket.gethostname()


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


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


def _describe(seen: Seen) -> str:
    h = seen.holder
    return (
        f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, command "
        f"{h.get('command') or '?'!r}, started {h.get('started_at', '?')}, last heartbeat "
        f"{h.get('heartbeat_at', '?')} ({seen.age:.0f} s ago)"
    )


def read_holder(run_dir: str) -> dict[str, Any] | None:
    """Who holds ``run_dir`` (the lock's JSON), or None when no run holds it."""
    seen = store_for(run_dir).read()
    return None if seen is None else seen.holder


def break_lock(run_dir: str) -> dict[str, Any] | None:
    """Remove the lock of a run that is gone; its holder, or None when there was no lock.

    Should that run be alive after all, its next ``ensure_held()`` stops it."""
    store = store_for(run_dir)
    for _ in range(5):
        seen = store.read()
        if seen is None:
            return None
        if store.remove(seen):
            log.warning("removed the lock of %s held by %s", run_dir, _describe(seen))
            return seen.holder
    raise RunDirLocked(f"the lock of {run_dir} keeps changing: the run holding it is alive")


def ensure_token(run_dir: str, token: str) -> None:
    """Raise ``RunDirLocked`` unless the run with ``token`` holds ``run_dir``: the check a worker
    makes before it commits, since only the driver holds the ``RunDirLock``. An unreadable lock
    passes (the driver's heartbeat decides then)."""
    try:
        seen = store_for(run_dir).read()
    except Exception as exc:
        log.debug("cannot read the lock of %s: %s", run_dir, exc)
        return
    if seen is None or seen.holder.get("token") != token:
        lost = "it was removed" if seen is None else f"it was taken over by {_describe(seen)}"
        raise RunDirLocked(
            f"lost the lock of {run_dir}: {lost}. This run stops so that two runs never write "
            "the run directory at once; its committed work is kept"
        )


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
        self._store = store_for(run_dir)
        self._holder: dict[str, Any] = {}
        self._tag: Any = None
        self._held, self._lost = False, None
        self._stop, self._mutex = threading.Event(), threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def holder(self) -> dict[str, Any]:
        """This lock's own record (empty before ``acquire``)."""
        return dict(self._holder)

    @property
    def token(self) -> str | None:
        """This run's token in the lock (None before ``acquire``): what ``ensure_token`` checks."""
        return self._holder.get("token")

    def _data(self) -> bytes:
        return (json.dumps(self._holder, indent=1, sort_keys=True) + "\n").encode()

    def _stale(self, seen: Seen) -> str | None:
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
            # storage.carry: the heartbeat writes with the run's storage settings.
            beat = storage.carry(self._beat)
            self._thread = threading.Thread(target=beat, name="run-lock", daemon=True)
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
