"""Latency of `semclust serve` against the same query on the command line, in one run.

For each size N a seeded synthetic run directory is indexed with ``semclust index`` (the index
the stage picks for N), then served by ``semclust serve`` in its own process on 127.0.0.1, and
queried over HTTP by 1 and by 8 concurrent clients (threads with their own connections), after a
warm-up that loads the model:

- ``POST /search`` by ``image_id`` (no model: the stored vector is searched);
- ``POST /search`` by upload of a real 500 x 375 JPEG (decode, EfficientNet-Lite0, search), on
  the run whose vectors have Lite0's 1280 dimensions.

Baseline, in the same run: ``semclust search --image-id`` and ``semclust search --image`` as a
fresh process each time, which is what a user without the service runs per query. The ratio is
the command's seconds per query over the service's median.

Runs: ``--sizes 10000 1000000``. N <= 100,000 rows are 1280-d (Lite0's width, so an upload can
be searched); larger ones 256-d (1 GB per million rows, as benchmarks/scale_10m.py), where only
``image_id`` is measured. Prints one JSON object per size, then a summary.

    python benchmarks/serve_latency.py --sizes 10000 1000000 --out /tmp/serve-latency.json
    python benchmarks/serve_latency.py --sizes 10000 --requests 40      # quick (~3 min)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from faiss_scale import synthetic  # noqa: E402

UPLOAD_DIM = 1280  # efficientnet_lite0's features
LARGE_DIM = 256
UPLOAD_MAX_N = 100_000


def write_run(run_dir: Path, n: int, seed: int, reuse: bool) -> int:
    """A seeded synthetic run of N rows, indexed by `semclust index`; returns the dimension
    (``reuse``: keep a complete run of N rows written by an earlier call)."""
    from tests.clustering.synthetic import EMBEDDER
    from tests.clustering.synthetic import write_run as write_rows

    from semclust import runinfo

    dim = UPLOAD_DIM if n <= UPLOAD_MAX_N else LARGE_DIM
    meta = run_dir / "index" / "meta.json"
    if reuse and meta.is_file() and json.loads(meta.read_text())["count"] == n:
        return dim
    if run_dir.exists():
        shutil.rmtree(run_dir)
    chunk = 500_000
    for c, s in enumerate(range(0, n, chunk)):
        x = synthetic(min(chunk, n - s), dim, seed * 1_000 + c)
        write_rows(
            run_dir,
            x,
            rows_per_part=50_000,
            embedder=None,
            first_part=s // 50_000,
            prefix=f"c{c:03d}",
        )
    record = {"status": "done", "embedded": n, "dim": dim, "embedder": EMBEDDER.__dict__}
    runinfo.update_stage(str(run_dir), "embed", record, {})
    env = {**os.environ, "RAY_ADDRESS": "local", "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "semclust.cli", "index", "--run-dir", str(run_dir)],
        check=True,
        env=env,
        capture_output=True,
    )
    print(
        f"# N={n}: run written and indexed in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return dim


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(1000 * s for s in seconds)
    return {
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "requests": len(ms),
    }


def measure(send: Any, clients: int, requests: int) -> dict[str, Any]:
    """``requests`` calls of ``send(i)`` spread over ``clients`` threads: latency percentiles
    and throughput."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.perf_counter()
            status = send(i)
            took = time.perf_counter() - start
            with lock:
                latencies.append(took)
                if status != 200:
                    errors.append(str(status))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        **_percentiles(latencies),
        "per_s": round(requests / wall, 1),
        "errors": len(errors),
    }


def command_line(run_dir: Path, args: list[str], repeats: int) -> dict[str, Any]:
    """Seconds of `semclust search` per query, a fresh process each time."""
    cmd = [sys.executable, "-m", "semclust.cli", "search", "--run-dir", str(run_dir), *args]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return {"seconds": [round(t, 2) for t in times], "median_s": round(statistics.median(times), 2)}


def bench_size(
    n: int, work: Path, requests: int, repeats: int, seed: int, reuse: bool
) -> dict[str, Any]:
    from tests.serve.server import Server

    from semclust.demo import make_query_image

    run_dir = work / f"run-{n}"
    dim = write_run(run_dir, n, seed, reuse)
    meta = json.loads((run_dir / "index" / "meta.json").read_text())
    rng = np.random.default_rng(seed)
    import pyarrow.parquet as pq

    all_ids = pq.read_table(run_dir / "index" / "ids.parquet", columns=["image_id"])
    query_ids = rng.choice(all_ids.column(0).to_numpy(), size=requests, replace=True).tolist()
    jpeg = make_query_image(work / "query.jpg", "coffee").read_bytes()
    out: dict[str, Any] = {"n": n, "dim": dim, "index": meta["spec"]["factory"]}
    logs = work / f"logs-{n}"
    logs.mkdir(exist_ok=True)
    with Server(run_dir, logs, timeout=600) as server:

        def by_id(i: int) -> int:
            body = {"image_id": query_ids[i % len(query_ids)], "k": 10}
            return server.post_json("/search", body).status

        def by_upload(i: int) -> int:
            return server.upload([("query.jpg", jpeg)], k=10).status

        kinds = {"image_id": by_id}
        if dim == UPLOAD_DIM:
            kinds["upload"] = by_upload
        for kind, send in kinds.items():
            measure(send, 1, 10)  # warm-up: loads the model, fills caches
            out[kind] = [measure(send, c, requests) for c in (1, 8)]
    query_path = work / "query.jpg"
    out["cli_image_id"] = command_line(run_dir, ["--image-id", str(query_ids[0])], repeats)
    if dim == UPLOAD_DIM:
        out["cli_upload"] = command_line(run_dir, ["--image", str(query_path)], repeats)
    for kind in ("image_id", "upload"):
        if kind in out:
            cli = out[f"cli_{kind}"]["median_s"] * 1000
            out[f"{kind}_cli_over_service_p50"] = round(cli / out[kind][0]["p50_ms"], 1)
    out["load_average"] = os.getloadavg()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--requests", type=int, default=200, help="requests per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="command-line runs per kind")
    parser.add_argument("--work", type=Path, default=Path("/tmp/serve-latency"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--reuse", action="store_true", help="keep run directories of the same N from --work"
    )
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.sizes:
        result = bench_size(n, args.work, args.requests, args.repeats, args.seed, args.reuse)
        print(json.dumps(result), flush=True)
        results.append(result)
    summary = {
        "summary": [
            {
                "n": r["n"],
                "image_id_p50_ms": r["image_id"][0]["p50_ms"],
                "image_id_p50_ms_8_clients": r["image_id"][1]["p50_ms"],
                "upload_p50_ms": r["upload"][0]["p50_ms"] if "upload" in r else None,
                "image_id_cli_over_service": r["image_id_cli_over_service_p50"],
                "upload_cli_over_service": r.get("upload_cli_over_service_p50"),
            }
            for r in results
        ]
    }
    print(json.dumps(summary), flush=True)
    if args.out:
        args.out.write_text("\n".join(json.dumps(r) for r in [*results, summary]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
