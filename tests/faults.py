"""Faults caused for real against the embed stage, shared by tests/embed/test_faults.py and
benchmarks/faults.py: a `semclust embed` process, an S3 server stopped and restarted under it,
Ctrl-C, a full disk, a second run on the same directory; and the checks of what each left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semclust import storage

UNUSABLE = {"empty.jpg", "truncated.jpg", "not-an-image.png"}  # the demo set's broken files


def embed_command(
    input_uri: str, run_dir: str, *extra: str, rows_per_part: int = 8, batch_size: int = 8
) -> list[str]:
    """`semclust embed` on the demo set with small parts and small input blocks, so rows come
    back (and parts commit) a few at a time."""
    return [
        sys.executable,
        "-m",
        "semclust.cli",
        "embed",
        input_uri,
        "--run-dir",
        run_dir,
        "--backbone",
        "efficientnet_lite0",
        "--weights",
        "default",
        "--rows-per-part",
        str(rows_per_part),
        "--batch-size",
        str(batch_size),
        "--num-cpus",
        "2",
        *extra,
    ]


def committed_parts(run_dir: str) -> int:
    return len(storage.list_shards(storage.join(run_dir, "embeddings")))


def embed_running(run_dir: str) -> bool:
    """run.json says the embed stage has started (the run directory is prepared and locked)."""
    try:
        info = storage.read_json(storage.join(run_dir, "run.json"))
    except (FileNotFoundError, OSError):
        return False
    return info.get("stages", {}).get("embed", {}).get("status") == "running"


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def model_actor_pids(root: int) -> list[int]:
    """The processes below ``root`` (the `semclust embed` driver, whose local Ray spawns the
    workers) that run the embed stage's model actor."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"EmbedActor" not in f.read():
                    continue
        except OSError:
            continue
        pid: int | None = int(entry)
        for _ in range(16):
            pid = _parent(pid) if pid else None
            if pid is None or pid <= 1:
                break
            if pid == root:
                found.append(int(entry))
                break
    return found


def model_actor_started(root: int) -> bool:
    """The embed stage's model actor runs below ``root``: from here on the reads of the images
    (decode runs in that actor on CPU) and the commits are still to come."""
    return bool(model_actor_pids(root))


@contextlib.contextmanager
def actors_paused(root: int):
    """SIGSTOP the model actors below ``root`` for the block (a stalled node), so a fault
    caused meanwhile lands while images are still to come, however fast the machine is;
    SIGCONT on the way out."""
    pids = model_actor_pids(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    try:
        yield pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def start_and_wait(
    cmd: list[str], env: dict[str, str], ready: Callable[[int], bool], timeout: float = 300
) -> subprocess.Popen:
    """Start ``cmd`` (its own process group) and return once ``ready(its pid)`` is true."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while not ready(proc.pid):
        if proc.poll() is not None:
            _out, err = proc.communicate()
            raise AssertionError(f"embed ended before the fault:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            stop_group(proc)
            raise AssertionError(f"the run was not ready for the fault in {timeout} s")
        time.sleep(0.05)
    return proc


def stop_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of a process group (the driver's Ray processes included)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    """Wait for the job; (exit status, stderr); whatever is left of its process group killed."""
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        stop_group(proc)
    return proc.returncode, err


def cli_message(stderr: str) -> str | None:
    """The CLI's own last message (Ray's logs of workers can still arrive after it, so not
    simply the last line of stderr); None when it printed none."""
    mine = [line for line in stderr.splitlines() if line.startswith("semclust: ")]
    return mine[-1] if mine else None


@dataclass
class Outcome:
    """What a run directory holds after a fault, against the images that were listed."""

    vectors: dict[str, np.ndarray]
    failures: dict[str, str]  # uri -> stage
    duplicated: int
    exit_codes: list[int] = field(default_factory=list)

    def lost(self, good_uris: set[str]) -> int:
        """Good images that are neither embedded (and a failure row counts as lost too)."""
        return len(good_uris - set(self.vectors))


class RefusingPort:
    """While the S3 server is down, its port accepts TCP connections and resets them at once
    (what a restarting load balancer does), counting them: so the test knows the job's reads or
    commits are reaching the outage, instead of guessing when they start."""

    def __init__(self, port: int) -> None:
        self.attempts = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self.attempts += 1
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # RST: connection reset by peer

    def wait_for_attempts(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.attempts < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.attempts >= n

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


def outage(
    store: Any,
    proc: subprocess.Popen,
    *,
    hold: float | None,
    min_attempts: int = 1,
    timeout: float = 120,
) -> int:
    """Take ``store`` away under ``proc`` until the job has tried it ``min_attempts`` times, then
    for ``hold`` more seconds (``None``: until the job exits, at most ``timeout``); bring it back
    on the same ports and data. Returns how many connections the outage refused.

    A lock heartbeat alone makes at most ``storage.max_attempts`` (5) connections; reads come
    8 at a time, each with the client's own retries, so a dozen means the data path is there."""
    port = int(store.endpoint.rsplit(":", 1)[1])
    store.kill()
    refusing = RefusingPort(port)
    try:
        reached = refusing.wait_for_attempts(min_attempts, timeout)
        if hold is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
        else:
            time.sleep(hold)
    finally:
        refusing.close()
        store.restart()
    assert reached, "the job never reached the store during the outage"
    return refusing.attempts


def read_outcome(run_dir: str) -> Outcome:
    vectors: dict[str, np.ndarray] = {}
    duplicated = 0
    for shard in storage.list_shards(storage.join(run_dir, "embeddings")):
        t = storage.read_parquet(shard)
        if t.num_rows == 0:  # a part whose every image was left for the resume
            continue
        flat = t["embedding"].combine_chunks().flatten().to_numpy()
        for uri, vec in zip(t["uri"].to_pylist(), flat.reshape(t.num_rows, -1), strict=True):
            duplicated += uri in vectors
            vectors[uri] = vec
    failures: dict[str, str] = {}
    for shard in storage.list_shards(storage.join(run_dir, "failures")):
        t = storage.read_parquet(shard, ["uri", "stage"]).to_pydict()
        for uri, stage in zip(t["uri"], t["stage"], strict=True):
            duplicated += uri in failures or uri in vectors
            failures[uri] = stage
    return Outcome(vectors, failures, duplicated)


def reference_embeddings(image_dir: Path) -> dict[str, np.ndarray]:
    """Every usable demo image embedded in this process, without Ray: the uninterrupted truth,
    keyed by the path relative to ``image_dir``."""
    from semclust.embed.backbones import Embedder
    from semclust.embed.decode import decode_image

    paths = sorted(
        p
        for p in image_dir.rglob("*")
        if p.is_file() and p.suffix != ".txt" and p.name not in UNUSABLE
    )
    embedder = Embedder("efficientnet_lite0", "default", batch_size=16)
    pixels = np.stack([decode_image(p.read_bytes(), 224).pixels for p in paths])
    vectors = embedder.embed(pixels)
    return {str(p.relative_to(image_dir)): v for p, v in zip(paths, vectors, strict=True)}


def relative(uri: str, prefix: str) -> str:
    """The image's path below the input ``prefix`` (a URI of the same form)."""
    assert uri.startswith(prefix), (uri, prefix)
    return uri[len(prefix) :].lstrip("/")


def check_complete(outcome: Outcome, prefix: str, reference: dict[str, np.ndarray]) -> None:
    """Every good image embedded once and equal to the reference; only the broken files failed."""
    assert outcome.duplicated == 0
    got = {relative(u, prefix): v for u, v in outcome.vectors.items()}
    assert set(got) == set(reference), sorted(set(reference) ^ set(got))[:10]
    failed = {relative(u, prefix).rsplit("/", 1)[-1]: s for u, s in outcome.failures.items()}
    assert set(failed) == UNUSABLE, failed
    assert "deferred" not in failed.values()
    worst = max(float(np.abs(got[k] - reference[k]).max()) for k in reference)
    assert worst < 1e-4, worst
