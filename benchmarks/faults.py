"""Faults tried for real against `semclust embed`, one row each: what happened, images lost or
duplicated, exit codes (the run, then its resume). Prints JSON lines and, with --markdown, the
table for benchmarks/RESULTS.md.

    python benchmarks/faults.py --per-class 20 --markdown

Each scenario embeds the demo set (12 classes x per_class good images + 3 broken files) with
EfficientNet-Lite0 into a fresh run directory, causes its fault once at least one part is
committed, and resumes when the run did not finish. "lost" counts good images that are neither
embedded at the end; "healthy failures" counts good images written as failure rows.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.faults import (
    UNUSABLE,
    cli_message,
    embed_command,
    finish,
    model_actor_started,
    outage,
    read_outcome,
    relative,
    start_and_wait,
)
from tests.s3server import ACCESS_KEY, SECRET_KEY, start_s3_server

from semclust import storage


def _last(err: str) -> str:
    return (cli_message(err) or "completed")[:200]


class Bench:
    def __init__(self, root: Path, per_class: int) -> None:
        from semclust.demo import build_demo_images

        self.root = root
        self.images = root / "images"
        build_demo_images(self.images, per_class=per_class, seed=1)
        self.good = {
            str(p.relative_to(self.images))
            for p in self.images.rglob("*")
            if p.is_file() and p.suffix != ".txt" and p.name not in UNUSABLE
        }
        self.store = start_s3_server(root / "s3")
        client = self.store.client()
        client.create_bucket(Bucket="faults")
        for path in sorted(self.images.rglob("*")):
            if path.is_file():
                key = f"images/{path.relative_to(self.images)}"
                client.put_object(Bucket="faults", Key=key, Body=path.read_bytes())
        os.environ.update(
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET_KEY,
            AWS_ENDPOINT_URL=self.store.endpoint,
            AWS_REGION="us-east-1",
        )
        storage.forget_clients()  # new endpoint and credentials in the environment
        self.n = 0

    def run_dir(self, where: str) -> str:
        self.n += 1
        if where == "s3":
            return f"s3://faults/runs/r{self.n}"
        return str(self.root / f"run{self.n}")

    def prefix(self, where: str) -> str:
        return "s3://faults/images" if where == "s3" else "file://" + str(self.images)

    def row(
        self,
        fault: str,
        source: str,
        run_dir: str,
        codes: list[int],
        message: str,
        seconds: float,
    ) -> dict:
        outcome = read_outcome(run_dir)
        prefix = self.prefix(source)
        got = {relative(u, prefix) for u in outcome.vectors}
        healthy_failed = [u for u in outcome.failures if u.rsplit("/", 1)[-1] not in UNUSABLE]
        return {
            "fault": fault,
            "exit_codes": codes,
            "message": message,
            "embedded": len(got),
            "good_images": len(self.good),
            "lost": len(self.good - got),
            "duplicated": outcome.duplicated,
            "healthy_failures": len(healthy_failed),
            "seconds": round(seconds, 1),
        }

    def scenario(
        self,
        fault: str,
        source: str,
        target: str,
        act: Callable[[subprocess.Popen, str], None],
        *extra: str,
    ) -> dict:
        run_dir = self.run_dir(target)
        cmd = embed_command(self.prefix(source) + "/", run_dir, *extra)
        start = time.monotonic()
        proc = start_and_wait(cmd, dict(os.environ), model_actor_started)
        act(proc, run_dir)
        code, err = finish(proc)
        codes, message = [code], _last(err)
        if code != 0:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            codes.append(done.returncode)
        return self.row(fault, source, run_dir, codes, message, time.monotonic() - start)

    def outage(self, hold: float | None) -> Callable[[subprocess.Popen, str], None]:
        """The store killed, its port resetting connections until the job has tried it and
        ``hold`` s more (None: until the job gives up), then back on the same ports and data."""

        def act(proc: subprocess.Popen, run_dir: str) -> None:
            outage(self.store, proc, hold=hold, min_attempts=12 if hold else 1)

        return act


def _signal(sig: int) -> Callable[[subprocess.Popen, str], None]:
    def act(proc: subprocess.Popen, run_dir: str) -> None:
        time.sleep(8)  # the model loaded, part of the images in flight
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)

    return act


def _second_run(bench: Bench, source: str) -> Callable[[subprocess.Popen, str], None]:
    def act(proc: subprocess.Popen, run_dir: str) -> None:
        cmd = embed_command(bench.prefix(source) + "/", run_dir)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        bench.second_runs.append((second.returncode, _last(second.stderr)))

    return act


def _plan(bench: Bench) -> list[tuple[str, str, str, Callable, tuple[str, ...]]]:
    """(fault, input on, run dir on, what to do once the model actor runs, extra flags)."""
    short = ("--set", "storage.retry_seconds=1")
    past_budget = "S3 down past a 1 s retry budget"
    return [
        ("S3 down, 10 s after the first refused read", "s3", "local", bench.outage(10), ()),
        ("S3 down, 60 s after the first refused request", "s3", "s3", bench.outage(60), ()),
        (f"{past_budget}: reads fail", "s3", "local", bench.outage(None), short),
        (f"{past_budget}: reads and commits fail", "s3", "s3", bench.outage(None), short),
        (f"{past_budget}: commits fail", "local", "s3", bench.outage(None), short),
        ("Ctrl-C (SIGINT to the driver)", "local", "local", _signal(signal.SIGINT), ()),
        ("SIGTERM to the driver (pod stopped)", "local", "local", _signal(signal.SIGTERM), ()),
        (
            "SIGKILL of the whole job (driver, raylet, workers)",
            "local",
            "local",
            _signal(signal.SIGKILL),
            (),
        ),
        ("second embed on the same run dir", "local", "local", _second_run(bench, "local"), ()),
        ("second embed on the same run dir", "local", "s3", _second_run(bench, "local"), ()),
    ]


def _run_plan(bench: Bench, only: str | None) -> list[dict]:
    rows: list[dict] = []
    plan = _plan(bench)
    if only:
        plan = [p for p in plan if only.lower() in p[0].lower()]
    for fault, source, target, act, extra in plan:
        row = bench.scenario(fault, source, target, act, *extra)
        row["fault"] = f"{fault} (input {source}, run dir {target})"
        if fault.startswith("second embed"):
            code, line = bench.second_runs[-1]  # type: ignore[attr-defined]
            row["second_run"] = {"exit_code": code, "message": line}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _print_markdown(rows: list[dict]) -> None:
    print(
        "\n| fault | exit codes (run, resume) | images lost | duplicated | healthy "
        "images as failures | message |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        msg = r.get("second_run", {}).get("message") or r["message"]
        codes = r["exit_codes"]
        if "second_run" in r:
            codes = [r["second_run"]["exit_code"], *codes]
        print(
            f"| {r['fault']} | {', '.join(map(str, codes))} | {r['lost']} | "
            f"{r['duplicated']} | {r['healthy_failures']} | {msg.replace('|', '/')} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--only", help="run only the faults whose name contains this")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="semclust-faults-") as tmp:
        bench = Bench(Path(tmp), args.per_class)
        bench.second_runs = []  # type: ignore[attr-defined]
        try:
            rows = _run_plan(bench, args.only)
        finally:
            bench.store.stop()
    if args.markdown:
        _print_markdown(rows)


if __name__ == "__main__":
    main()
