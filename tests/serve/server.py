"""`semclust serve` as a separate process, and a small HTTP client for it (the standard library's,
so the tests talk to the server exactly as any other client does)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

# TensorFlow's C++ start-up lines, which must not reach a user's terminal.
TF_NOISE = ("oneDNN", "cuInit", "absl::InitializeLog", "cpu_feature_guard", "TF-TRT", "cuda_")


def quiet_env() -> dict[str, str]:
    """This session's environment without the tests' own TF_CPP_MIN_LOG_LEVEL, so that a test
    sees what a user's terminal shows."""
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


class Server:
    """Starts ``semclust serve --port 0`` on ``run_dir``, reads the address it prints and waits
    for /health; stops it with SIGINT (Ctrl-C) on exit."""

    def __init__(self, run_dir: Path | str, logs: Path, *extra: str, timeout: float = 90) -> None:
        self.run_dir = str(run_dir)
        self.out_path, self.err_path = logs / "serve.out", logs / "serve.err"
        cmd = [sys.executable, "-m", "semclust.cli", "serve", "--run-dir", self.run_dir]
        self.out = open(self.out_path, "wb")  # noqa: SIM115 - closed in stop()
        self.err = open(self.err_path, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [*cmd, "--port", "0", *extra], stdout=self.out, stderr=self.err, env=quiet_env()
        )
        deadline = time.monotonic() + timeout
        self.url = ""
        while not self.url:
            found = re.search(rb"http://127\.0\.0\.1:(\d+)/", self.out_path.read_bytes())
            if found:
                self.url = f"http://127.0.0.1:{int(found.group(1))}"
            elif self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"semclust serve did not start:\n{self.stderr()}")
            else:
                time.sleep(0.2)
        while self.get("/health").status != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("semclust serve does not answer /health")
            time.sleep(0.2)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.out.close()
        self.err.close()
        return self.process.returncode

    # --- HTTP ------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        req = urllib.request.Request(
            self.url + path, data=body, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return Response(r.status, dict(r.headers), r.read())
        except urllib.error.HTTPError as e:
            return Response(e.code, dict(e.headers), e.read())

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def post_json(self, path: str, obj: Any, method: str = "POST") -> Response:
        body = json.dumps(obj).encode()
        return self.request(method, path, body, {"Content-Type": "application/json"})

    def upload(self, files: list[tuple[str, bytes]], **fields: Any) -> Response:
        """POST /search as multipart/form-data: ``files`` as (file name, bytes) in 'image'."""
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in fields.items():
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                f"{value}\r\n".encode()
            )
        for file_name, data in files:
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                f'filename="{file_name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
            )
            parts.append(head.encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        return self.request("POST", "/search", body, headers)
