"""Cluster quality on Fashion-MNIST (70,000 images, 10 classes), through the whole pipeline.

The images are written as PNG objects to a SeaweedFS S3 server on 127.0.0.1, embedded from
there with ``efficientnet_lite0`` into a run directory on the same server, clustered with k=10,
and scored against the true classes. Each stage's wall time is reported. Re-running with the same
``--data-dir`` resumes: the upload and committed embedding shards are kept.

    python benchmarks/quality_fmnist.py --data-dir /tmp/semclust-fmnist            # all 70k
    python benchmarks/quality_fmnist.py --data-dir /tmp/fm-small --limit 5000      # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from fmnist import start_server, upload_fmnist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default="/tmp/semclust-fmnist", help="S3 server data folder")
    p.add_argument("--bucket", default="fmnist")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--run-name", default="lite0")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--stop-after", choices=["upload", "embed", "all"], default="all")
    args = p.parse_args()

    from semclust.config import load_config
    from semclust.runner import stage_function

    server = start_server(Path(args.data_dir))
    figures: dict = {"date": time.strftime("%Y-%m-%d"), "limit": args.limit}
    try:
        start = time.perf_counter()
        figures["images"] = upload_fmnist(server, args.bucket, args.limit)
        figures["upload_seconds"] = round(time.perf_counter() - start, 1)
        if args.stop_after == "upload":
            return
        run_dir = f"s3://{args.bucket}/runs/{args.run_name}"
        cfg = load_config(
            None,
            {
                "run_dir": run_dir,
                "ray.num_cpus": args.num_cpus,
                "embed.input": f"s3://{args.bucket}/fmnist/",
                "embed.backbone": "efficientnet_lite0",
                "embed.weights": "default",
                "embed.batch_size": args.batch_size,
                "embed.rows_per_part": 5000,
                "cluster.k": 10,
                "cluster.nredo": 5,
                "graph.k": 20,
            },
        )
        stages = ["embed"] if args.stop_after == "embed" else ["embed", "cluster", "graph", "index"]
        for name in stages:
            start = time.perf_counter()
            record = stage_function(name)(cfg)
            figures[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
            if name == "embed":
                figures["embed"] = {
                    k: record[k] for k in ("listed", "embedded", "failed", "images_per_second")
                }
        if args.stop_after == "all":
            from semclust.evaluate import evaluate_run

            figures["kmeans"] = evaluate_run(run_dir, f"s3://{args.bucket}/fmnist-labels.parquet")[
                "kmeans"
            ]
    finally:
        print(json.dumps(figures), flush=True)
        server.stop()


if __name__ == "__main__":
    main()
