"""Kill-and-resume on a large S3 run: `semclust embed` from a manifest on the local S3 server.

The Fashion-MNIST PNGs (benchmarks/fmnist.py) sit in a SeaweedFS server on 127.0.0.1. A seeded
manifest of N of them (Parquet, `uri` column) is the input; the run directory is on the same
server. The embed command runs as a subprocess and is killed with SIGKILL once `--kill-after`
parts have been committed; the same command then runs again and must finish the rest. Checked
and printed as JSON: listed = embedded + failed, every manifest URI exactly once, no duplicate
image_id, and, where an earlier run of the same images exists (`--compare-run`), the largest
difference between the two embeddings of each URI.

    python benchmarks/resume_s3.py --images 24000 --kill-after 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fmnist import start_server, upload_fmnist


def _committed(run_dir: str) -> int:
    from semclust import storage

    return len(storage.list_shards(storage.join(run_dir, "embeddings")))


def _embed_command(manifest: str, run_dir: str, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        "-m",
        "semclust.cli",
        "embed",
        manifest,
        "--run-dir",
        run_dir,
        "--backbone",
        "efficientnet_lite0",
        "--weights",
        "default",
        "--batch-size",
        str(args.batch_size),
        "--rows-per-part",
        str(args.rows_per_part),
        "--num-cpus",
        str(args.num_cpus),
    ]


def _embeddings(run_dir: str) -> dict[str, np.ndarray]:
    from semclust import storage

    table = storage.read_parquet(storage.join(run_dir, "embeddings"), ["uri", "embedding"])
    matrix = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(
        table.num_rows, -1
    )
    return dict(zip(table.column("uri").to_pylist(), matrix, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default="/tmp/semclust-fmnist", help="S3 server data folder")
    p.add_argument("--bucket", default="fmnist")
    p.add_argument("--images", type=int, default=24_000)
    p.add_argument("--rows-per-part", type=int, default=2_000)
    p.add_argument("--kill-after", type=int, default=3, help="committed parts before SIGKILL")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--run-name", default="resume")
    p.add_argument(
        "--compare-run", default="lite0", help="earlier run of the same images (run name)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import pyarrow as pa

    from semclust import storage

    server = start_server(Path(args.data_dir))
    out: dict = {"date": time.strftime("%Y-%m-%d"), "images": args.images}
    try:
        upload_fmnist(server, args.bucket)
        labels = storage.read_parquet(f"s3://{args.bucket}/fmnist-labels.parquet")
        rng = np.random.default_rng(args.seed)
        pick = np.sort(rng.choice(labels.num_rows, size=args.images, replace=False))
        manifest = f"s3://{args.bucket}/manifests/{args.run_name}-{args.images}.parquet"
        storage.write_parquet(manifest, pa.table({"uri": labels.column("uri").take(pick)}))
        run_dir = f"s3://{args.bucket}/runs/{args.run_name}-{args.images}"
        if storage.exists(run_dir):
            storage.remove_tree(run_dir)
        command = _embed_command(manifest, run_dir, args)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

        start = time.perf_counter()
        log_path = Path(args.data_dir).parent / f"{args.run_name}-first.log"
        with open(log_path, "w") as log:  # a file, not a pipe: TF's logging would fill a pipe
            first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            while first.poll() is None and _committed(run_dir) < args.kill_after:
                time.sleep(2)
        if first.poll() is not None:
            raise SystemExit(f"the first run ended before the kill; see {log_path}")
        first.send_signal(signal.SIGKILL)
        first.wait()
        # The killed driver's local Ray (started by ray.init in it) may outlive it; run this
        # benchmark alone on the machine, as this stops every Ray process here.
        ray_cli = str(Path(sys.executable).parent / "ray")
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, check=False)
        out["killed_after_seconds"] = round(time.perf_counter() - start, 1)
        out["parts_committed_at_kill"] = _committed(run_dir)

        start = time.perf_counter()
        second = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        out["resume_seconds"] = round(time.perf_counter() - start, 1)
        if second.returncode != 0:
            raise SystemExit(f"the resumed run failed: {second.stderr[-3000:]}")
        record = storage.read_json(storage.join(run_dir, "run.json"))["stages"]["embed"]
        out["record"] = {
            k: record.get(k)
            for k in (
                "listed",
                "embedded",
                "failed",
                "already_committed",
                "processed_this_run",
                "images_per_second",
                "listing_pages",
            )
        }
        emb = storage.read_parquet(storage.join(run_dir, "embeddings"), ["image_id", "uri"])
        ids = emb.column("image_id").to_numpy()
        wanted = set(labels.column("uri").take(pick).to_pylist())
        got = emb.column("uri").to_pylist()
        out["rows"] = len(got)
        out["distinct_image_ids"] = len(np.unique(ids))
        out["every_uri_once"] = len(got) == len(set(got)) and set(got) == wanted
        earlier = f"s3://{args.bucket}/runs/{args.compare_run}"
        if args.compare_run and storage.exists(storage.join(earlier, "embeddings")):
            new, old = _embeddings(run_dir), _embeddings(earlier)
            diffs = [float(np.abs(v - old[u]).max()) for u, v in new.items() if u in old]
            out["compared_with"] = earlier
            out["compared_uris"] = len(diffs)
            out["max_abs_difference"] = max(diffs) if diffs else None
    finally:
        print(json.dumps(out), flush=True)
        server.stop()


if __name__ == "__main__":
    main()
