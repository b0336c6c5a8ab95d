"""Cluster quality on Fashion-MNIST (70,000 images, 10 classes), through the whole pipeline.

The images are written as PNG objects to a SeaweedFS S3 server on 127.0.0.1, embedded from
there with ``efficientnet_lite0`` (or ``--backbone``) into a run directory on the same server,
clustered with k=10 (k-means), given a k=20 kNN graph and an index, refined with the SCAN and
DEC heads, labelled from 1% of the true labels (seed-label mode), and scored against the true
classes. Each stage's wall time is reported. Re-running with the same ``--data-dir`` resumes:
the upload and committed embedding shards are kept.

    python benchmarks/quality_fmnist.py --data-dir /tmp/semclust-fmnist            # all 70k
    python benchmarks/quality_fmnist.py --data-dir /tmp/fm-small --limit 5000      # a subset
    python benchmarks/quality_fmnist.py --backbone efficientnet_lite2              # run "lite2"

With ``--run-dir`` an existing run directory (e.g. a local copy of the run above) is used and no
server is started; only the later phases run (refine, evaluate, label by default; the class of an
image is the folder in its URI, as the uploader writes them):

    python benchmarks/quality_fmnist.py --run-dir /tmp/fmnist-run
    python benchmarks/quality_fmnist.py --run-dir /tmp/fmnist-run --phases scan,evaluate
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from fmnist import start_server, upload_fmnist

PIPELINE = ("embed", "cluster", "graph", "index")
LATER = ("scan", "dec", "evaluate", "label")
ALL_PHASES = (*PIPELINE, *LATER)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default="/tmp/semclust-fmnist", help="S3 server data folder")
    p.add_argument("--bucket", default="fmnist")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument(
        "--backbone",
        default="efficientnet_lite0",
        help="efficientnet_lite0 (default), efficientnet_lite1 or efficientnet_lite2 (packaged "
        "weights); use --run-name to keep each backbone's run",
    )
    p.add_argument("--run-name", default=None, help="default: the backbone's short name")
    p.add_argument("--run-dir", help="an existing run directory: no server, later phases only")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--stop-after",
        choices=["upload", "embed", "all"],
        default="all",
        help="upload: only the images; embed: no later stage",
    )
    p.add_argument(
        "--phases",
        help=f"comma-separated subset of {','.join(ALL_PHASES)} (default: all with the server, "
        f"{','.join(LATER)} with --run-dir)",
    )
    p.add_argument("--seed-fraction", type=float, default=0.01, help="seed labels: share of images")
    p.add_argument("--scan-epochs", type=int, default=None, help="default: RefineConfig's")
    p.add_argument("--scan-self-label-epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    phases = _phases(args)
    figures: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "backbone": args.backbone,
        "limit": args.limit,
        "phases": phases,
    }
    server = None
    try:
        if args.run_dir:
            run_dir = args.run_dir
        else:
            server = start_server(Path(args.data_dir))
            start = time.perf_counter()
            figures["images"] = upload_fmnist(server, args.bucket, args.limit)
            figures["upload_seconds"] = round(time.perf_counter() - start, 1)
            if args.stop_after == "upload":
                return
            run_name = args.run_name or args.backbone.removeprefix("efficientnet_")
            run_dir = f"s3://{args.bucket}/runs/{run_name}"
            _pipeline(args, run_dir, phases, figures)
        figures["run_dir"] = run_dir
        _later(args, run_dir, phases, figures)
    finally:
        print(json.dumps(figures), flush=True)
        if server is not None:
            server.stop()


def _phases(args: argparse.Namespace) -> list[str]:
    if args.phases:
        chosen = [x.strip() for x in args.phases.split(",") if x.strip()]
        unknown = sorted(set(chosen) - set(ALL_PHASES))
        if unknown:
            raise SystemExit(f"unknown phase(s) {unknown}; choose from {', '.join(ALL_PHASES)}")
        if args.run_dir and set(chosen) & set(PIPELINE):
            raise SystemExit("--run-dir runs the later phases only: " + ", ".join(LATER))
        return chosen
    if args.run_dir:
        return list(LATER)
    if args.stop_after == "embed":
        return ["embed"]
    return list(ALL_PHASES)


def _pipeline(args: argparse.Namespace, run_dir: str, phases: list[str], figures: dict) -> None:
    """embed, cluster, graph, index: the stages' own code, on the S3 server."""
    from semclust.config import load_config
    from semclust.runner import run_stages

    cfg = load_config(
        None,
        {
            "run_dir": run_dir,
            "ray.num_cpus": args.num_cpus,
            "embed.input": f"s3://{args.bucket}/fmnist/",
            "embed.backbone": args.backbone,
            "embed.weights": "default",
            "embed.batch_size": args.batch_size,
            "embed.rows_per_part": 5000,
            "cluster.k": 10,
            "cluster.nredo": 5,
            "graph.k": 20,
        },
    )
    for name in (s for s in PIPELINE if s in phases):
        start = time.perf_counter()
        record = run_stages(cfg, [name])[name]
        figures[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
        if name == "embed":
            figures["embed"] = {
                k: record[k] for k in ("listed", "embedded", "failed", "images_per_second")
            }


def _later(args: argparse.Namespace, run_dir: str, phases: list[str], figures: dict) -> None:
    """SCAN and DEC heads, evaluation against the true classes, 1% seed labels."""
    from semclust.config import RefineConfig, RunConfig
    from semclust.evaluate import evaluate_run, headline
    from semclust.runner import run_stages

    scan_overrides = {}
    if args.scan_epochs is not None:
        scan_overrides["epochs"] = args.scan_epochs
    if args.scan_self_label_epochs is not None:
        scan_overrides["self_label_epochs"] = args.scan_self_label_epochs
    for method in ("scan", "dec"):
        if method not in phases:
            continue
        rc = RefineConfig(method=method, **(scan_overrides if method == "scan" else {}))
        start = time.perf_counter()
        cfg = RunConfig(run_dir=run_dir, mode="overwrite", refine=rc)
        cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, num_cpus=args.num_cpus))
        record = run_stages(cfg, [f"refine_{method}"])[f"refine_{method}"]
        figures[f"{method}_seconds"] = round(time.perf_counter() - start, 1)
        figures[method] = {
            key: record.get(key)
            for key in ("k", "rows", "train_seconds", "cluster_sizes", "converged", "updates")
            if record.get(key) is not None
        }
        figures[method]["settings"] = {
            k: v for k, v in record["settings"]["refine"].items() if k in _SHOWN_SETTINGS
        }
    if "label" in phases:
        from semclust import runner
        from semclust.config import LabelConfig, RunConfig

        seeds_uri = _seed_file(run_dir, args.seed_fraction, args.seed)
        start = time.perf_counter()
        cfg = RunConfig(run_dir=run_dir, label=LabelConfig(seed_labels=seeds_uri, seed=args.seed))
        record = runner.run_stages(cfg, ["label"])["label"]
        figures["label_seconds"] = round(time.perf_counter() - start, 1)
        figures["label"] = {
            "seed_fraction": args.seed_fraction,
            "seeds": record["seeds"],
            "cross_validated_accuracy": record["cross_validation"]["accuracy"],
            "method": record["method"],
        }
    if "evaluate" in phases or "label" in phases:
        start = time.perf_counter()
        metrics = evaluate_run(run_dir, "folder-names", seed=args.seed)
        figures["evaluate_seconds"] = round(time.perf_counter() - start, 1)
        figures["metrics"] = headline(metrics)
        if metrics.get("labels") and "label" in figures:
            # Accuracy on the images whose label was not given (unknown counts as wrong).
            figures["label"]["accuracy_on_the_rest"] = metrics["labels"]["without_seeds"][
                "accuracy_all_rows"
            ]


_SHOWN_SETTINGS = (
    "epochs",
    "heads",
    "hidden",
    "entropy_weight",
    "num_neighbors",
    "input_dropout",
    "self_label_epochs",
    "confidence_threshold",
    "batch_size",
    "learning_rate",
    "dec_learning_rate",
    "dec_tolerance",
)


def _seed_file(run_dir: str, fraction: float, seed: int) -> str:
    """``uri,label`` for a seeded random ``fraction`` of the run's images (class = folder)."""
    import numpy as np
    import pyarrow as pa

    from semclust import storage
    from semclust.evaluate import truth_from_folders
    from semclust.rundir.layout import EMBEDDINGS

    uris = [
        u
        for shard in storage.list_shards(storage.join(run_dir, EMBEDDINGS))
        for u in storage.read_parquet(shard, ["uri"])["uri"].to_pylist()
    ]
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(uris), size=max(2, round(fraction * len(uris))), replace=False))
    chosen = [uris[i] for i in pick]
    out = storage.join(run_dir, "benchmark", f"seed-labels-{fraction:g}-{seed}.parquet")
    storage.write_parquet(out, pa.table({"uri": chosen, "label": truth_from_folders(chosen)}))
    return out


if __name__ == "__main__":
    main()
