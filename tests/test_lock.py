"""semclust.lock against real processes, a real disk and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from semclust import lock, lockstore, storage
from semclust.errors import RunDirLocked

HOLDER = Path(__file__).with_name("lockholder.py")


@pytest.fixture(params=["local", "s3"])
def run_dir(request, tmp_path) -> str:
    """A run directory that does not exist yet, on the local disk or on S3."""
    if request.param == "local":
        return str(tmp_path / "runs" / "r1")
    return f"s3://{request.getfixturevalue('s3_bucket')}/runs/r1"


class Holder:
    """A lockholder.py process and its output lines."""

    def __init__(self, run_dir: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HOLDER), run_dir, *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def next(self, timeout: float = 30.0) -> str:
        return self.lines.get(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def _acquired(holder: Holder) -> int:
    assert holder.next() == "READY"
    word, _, pid = holder.next().partition(" ")
    assert word == "ACQUIRED", word
    return int(pid)


def _fake_lock(run_dir: str, host: str, age: float, **fields: object) -> None:
    """A lock written by hand: a run on ``host`` whose last heartbeat is ``age`` s old."""
    beat = (datetime.now(timezone.utc) - timedelta(seconds=age)).isoformat()
    holder = {
        "host": host,
        "pid": 4242,
        "token": "f" * 32,
        "command": "semclust run",
        "started_at": beat,
        "heartbeat_at": beat,
        **fields,
    }
    uri = storage.join(run_dir, lockstore.LOCK_NAME)
    storage.write_bytes(uri, json.dumps(holder).encode())
    if not storage.is_remote(run_dir):
        os.utime(storage.resolve(uri)[1], (time.time() - age, time.time() - age))


def test_refused_while_held_then_taken_over_after_sigkill(run_dir, caplog):
    holder = Holder(run_dir, "--hold", "60")
    try:
        pid = _acquired(holder)
        with pytest.raises(RunDirLocked) as err:
            lock.RunDirLock(run_dir).acquire()
        message = str(err.value)
        assert f"host {socket.gethostname()}, pid {pid}, command 'lockholder'" in message
        unlock = rf"If that run is gone, run `semclust unlock --run-dir {re.escape(run_dir)}`"
        wait = re.search(unlock + r" or wait (\d+) s for the lock to go stale", message)
        assert wait and 60 < int(wait.group(1)) <= 90  # stale_seconds (90) - the lock's age
        assert lock.read_holder(run_dir)["pid"] == pid

        os.kill(pid, signal.SIGKILL)  # never reaped before the acquire: a zombie counts as gone
        deadline = time.monotonic() + 20
        while lock._process_start(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)  # the kernel is still tearing it down (slow on a loaded machine)
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="semclust.lock"):
            ours = lock.RunDirLock(run_dir, command="test").acquire()
        assert time.monotonic() - start < 15  # at once, not after stale_seconds (90)
        assert f"process {pid} on this host is gone" in caplog.text
        assert lock.read_holder(run_dir)["token"] == ours.holder["token"]
        ours.ensure_held()
        ours.release()
        ours.release()  # idempotent
        assert lock.read_holder(run_dir) is None
    finally:
        holder.stop()


def test_lock_of_another_host_taken_over_once_stale(run_dir, caplog):
    _fake_lock(run_dir, "other-host", age=0)
    with pytest.raises(RunDirLocked, match=r"host other-host, pid 4242.* or wait \d s"):
        lock.RunDirLock(run_dir, heartbeat_seconds=0.5, stale_seconds=3).acquire()
    if storage.is_remote(run_dir):
        time.sleep(4.2)  # S3 ages the lock by the server's LastModified vs its Date
    else:
        _fake_lock(run_dir, "other-host", age=10)
    with caplog.at_level(logging.WARNING, logger="semclust.lock"):
        ours = lock.RunDirLock(run_dir, heartbeat_seconds=0.5, stale_seconds=3).acquire()
    assert "no heartbeat for" in caplog.text and "other-host" in caplog.text
    assert lock.read_holder(run_dir)["host"] == socket.gethostname()
    ours.release()


def test_reused_pid_on_this_host_is_taken_over_at_once(run_dir, caplog):
    # This process's own pid, alive, but started at another time: the holder is gone.
    _fake_lock(
        run_dir,
        socket.gethostname(),
        age=0,
        pid=os.getpid(),
        pid_ns=lock._pid_ns(),
        process_start=12345.0,
    )
    with caplog.at_level(logging.WARNING, logger="semclust.lock"), lock.RunDirLock(run_dir) as ours:
        assert lock.read_holder(run_dir)["token"] == ours.holder["token"]
    assert f"pid {os.getpid()} on this host is now another process" in caplog.text


def test_heartbeat_keeps_a_live_holder_fresh(run_dir, tmp_path):
    stop = tmp_path / "stop"
    args = ("--host", "elsewhere", "--heartbeat", "0.3", "--stale", "3", "--stop", str(stop))
    holder = Holder(run_dir, *args)
    try:
        _acquired(holder)
        time.sleep(4)  # past stale_seconds: only the heartbeat keeps it
        with pytest.raises(RunDirLocked, match="host elsewhere"):
            lock.RunDirLock(run_dir, heartbeat_seconds=0.3, stale_seconds=3).acquire()
        seen = lock.read_holder(run_dir)
        assert seen["heartbeat_at"] > seen["started_at"]
        stop.touch()
        assert holder.next() == "RELEASED"
        assert lock.read_holder(run_dir) is None  # released its own lock
    finally:
        holder.stop()


def test_taken_over_holder_stops_and_leaves_the_new_lock(run_dir):
    first = lock.RunDirLock(run_dir, command="first", heartbeat_seconds=0.2, stale_seconds=5)
    with first:
        first.ensure_held()
        assert lock.break_lock(run_dir)["token"] == first.holder["token"]
        second = lock.RunDirLock(run_dir, command="second").acquire()
        first._thread.join(timeout=10)  # its heartbeat finds the lock is not its own: stops
        assert not first._thread.is_alive()
        with pytest.raises(RunDirLocked, match=r"lost the lock .* taken over by .*'second'"):
            first.ensure_held()
    assert lock.read_holder(run_dir)["token"] == second.holder["token"]  # first released nothing
    second.release()
    assert lock.read_holder(run_dir) is None
    assert lock.break_lock(run_dir) is None


def test_racing_processes_one_wins(run_dir, tmp_path):
    go, stop = tmp_path / "go", tmp_path / "stop"
    holders = [Holder(run_dir, "--go", str(go), "--stop", str(stop)) for _ in range(5)]
    try:
        assert [h.next(timeout=60) for h in holders] == ["READY"] * 5
        go.touch()
        words = sorted(h.next().split(" ", 1)[0] for h in holders)
        assert words == ["ACQUIRED"] + ["LOCKED"] * 4
    finally:
        stop.touch()
        for h in holders:
            h.proc.wait(timeout=30)
            h.stop()
    assert lock.read_holder(run_dir) is None


def test_s3_without_conditional_writes_falls_back(s3_bucket, monkeypatch):
    monkeypatch.setattr(lockstore, "SETTLE_SECONDS", 0.2)
    run_dir = f"s3://{s3_bucket}/runs/r1"
    first, second = lock.RunDirLock(run_dir), lock.RunDirLock(run_dir)
    first._store.conditional = second._store.conditional = False  # as on a store without them
    with first:
        with pytest.raises(RunDirLocked, match=f"pid {os.getpid()}"):
            second.acquire()
        first.ensure_held()
    assert lock.read_holder(run_dir) is None
