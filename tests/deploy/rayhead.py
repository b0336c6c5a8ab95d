"""A real Ray head on 127.0.0.1 for job-submission tests: `ray start --head --block` with the
dashboard (the job server lives there), every port chosen free, its own temp dir.

It is stopped by its own process ids, never by `ray stop` (which stops every Ray process of the
machine, other test runs' included): SIGTERM to the blocking `ray start` lets it shut its
processes down; whatever of its process tree is still alive after that gets SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.s3server import free_port

_PORT_FLAGS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


Proc = tuple[int, str]  # (pid, start time): a pid alone may be reused by another process


def _children() -> dict[int, list[Proc]]:
    """Parent pid -> child processes, from /proc."""
    tree: dict[int, list[Proc]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            tree.setdefault(int(fields[1]), []).append((int(entry), fields[19]))
    return tree


def descendants(pid: int) -> list[Proc]:
    """Every process below ``pid`` (Linux /proc)."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def _still_running(proc: Proc) -> bool:
    fields = _stat(proc[0])
    return fields is not None and fields[19] == proc[1] and fields[0] != "Z"


def kill_tree(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM ``proc``, wait up to ``grace`` seconds, then SIGKILL what is left of its tree
    (only the very processes seen below it, checked by pid and start time)."""
    tree = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    tree += [p for p in descendants(proc.pid) if p not in tree]
    if proc.poll() is None:
        proc.kill()
    for child in tree:
        if _still_running(child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child[0], signal.SIGKILL)
    proc.wait(timeout=30)


@dataclass
class LocalRayHead:
    process: subprocess.Popen
    dashboard_url: str  # http://127.0.0.1:PORT: the job server
    temp_dir: Path
    log_path: Path

    def client(self) -> Any:
        """A job submission client of this head."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url)

    def submit(self, timeout: float = 180.0, **kwargs: Any) -> str:
        """Submit a job, retrying while the head's job agent is still starting."""
        import requests

        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.client().submit_job(**kwargs)
            except (RuntimeError, ConnectionError, requests.ConnectionError) as exc:
                # Right after start: "No available agent to submit job", or the dashboard
                # dropping the package upload of a busy head. Both are safe to retry: the
                # package is content-addressed and no job was created.
                transient = not isinstance(exc, RuntimeError) or "agent" in str(exc)
                if not transient or time.monotonic() > deadline:
                    raise
                time.sleep(2.0)

    def wait(self, job_id: str, timeout: float) -> str:
        """Poll until the job is terminal; returns its status name."""
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            status = str(client.get_job_status(job_id).value)
            if status in TERMINAL:
                return status
            if time.monotonic() > deadline:
                client.stop_job(job_id)
                raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f} s")
            time.sleep(1.0)

    def stop(self) -> None:
        kill_tree(self.process)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def start_ray_head(
    env: dict[str, str], num_cpus: int = 2, timeout: float = 240.0, attempts: int = 3
) -> LocalRayHead:
    """Start a head on 127.0.0.1 with a job server; returns once `ray start` reports the node
    started and the job API answers. A start that times out (Ray waits 30 s for its raylet,
    which a loaded 2-core machine can miss) is tried again in a fresh temp dir."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_once(env, num_cpus, timeout)
        except RuntimeError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _start_once(env: dict[str, str], num_cpus: int, timeout: float) -> LocalRayHead:
    from ray.job_submission import JobSubmissionClient

    # Short and private: Ray's socket paths live under it and must stay under 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="scray-", dir="/tmp"))
    ports = {flag: free_port() for flag in _PORT_FLAGS}
    args = [
        ray_cli(),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *[f"--{flag}={port}" for flag, port in ports.items()],
    ]
    # `python` in a job's entrypoint must be this environment's, as on a node of Ray's images.
    env = dict(env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    # A busy 2-core machine can take longer than Ray's default 60 s to bring the dashboard up.
    env.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "180")
    log_path = temp_dir / "head.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT)
    head = LocalRayHead(proc, f"http://127.0.0.1:{ports['dashboard-port']}", temp_dir, log_path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if "Ray runtime started" in log_path.read_text(errors="replace"):
                JobSubmissionClient(head.dashboard_url).list_jobs()
                return head
            problem = "`ray start` has not reported the node started"
        except Exception as exc:
            problem = str(exc)
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = head.log_tail()
            head.stop()
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise RuntimeError(f"the Ray head did not start: {problem}\n{tail}")
        time.sleep(1.0)
