"""Embedding throughput: the full semclust pipeline vs the bare model vs a naive predict loop.

On the same kind of images and batch size, in one run (the machine is noisy, so only ratios within
one run are compared):
  (a) pipeline: the embed stage end to end on N images (listing, Ray Data read + decode tasks, the
      actor pool, committing Parquet shards), cold start included; and its marginal rate,
      N / (t(2N) - t(N)) from two warm runs on N and 2N images, which cancels the fixed costs
      (Ray Data and actor start-up, about 10 s on CPU) that dominate a short run;
  (b) bare model: ``Embedder.embed`` on pre-decoded uint8 batches in this process;
  (c) naive: ``model.predict`` called once per image.
Prints one JSON object per backbone and source.

    python benchmarks/embed_throughput.py --backbones efficientnet_lite0 resnet50 \
        --images 960 --source local s3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _weights_for(backbone: str) -> str:
    # resnet50's ImageNet weights cannot be downloaded offline; the speed is the same with random.
    return "default" if backbone == "efficientnet_lite0" else "random"


def _pipeline_seconds(backbone: str, source: str, batch: int, threads: int | None) -> tuple:
    from semclust import runner
    from semclust.config import load_config

    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{backbone}-"))
    overrides = {
        "run_dir": str(run_dir),
        "mode": "overwrite",
        "embed.rows_per_part": 10_000,
        "embed.input": source,
        "embed.backbone": backbone,
        "embed.weights": _weights_for(backbone),
        "embed.batch_size": batch,
        "embed.threads": threads,
    }
    start = time.perf_counter()
    record = runner.run_stages(load_config(None, overrides), ["embed"])["embed"]
    seconds = time.perf_counter() - start
    shutil.rmtree(run_dir, ignore_errors=True)
    return seconds, record


def bench_backbone(
    backbone: str,
    images: Path,
    sources: tuple[str, str],
    n: int,
    batch: int,
    naive_n: int,
    threads: int | None = None,
) -> dict:
    """``sources``: the URIs of N and of 2N images the pipeline reads (local folders or their
    copies on S3); ``images`` is the local folder of the N."""
    from semclust.embed.backbones import Embedder
    from semclust.embed.decode import decode_batch
    from semclust.embed.sources import list_images

    weights = _weights_for(backbone)
    # The first run pays the cold start (worker processes importing TensorFlow); Ray reuses
    # those workers afterwards, so the marginal rate compares two warm runs.
    pipeline_s, record = _pipeline_seconds(backbone, sources[0], batch, threads)
    warm_s, _ = _pipeline_seconds(backbone, sources[0], batch, threads)
    double_s, double = _pipeline_seconds(backbone, sources[1], batch, threads)
    extra = double["embedded"] - record["embedded"]

    uris = list_images(str(images)).uris
    blobs = [Path(u[len("file://") :]).read_bytes() for u in uris]
    embedder = Embedder(backbone, weights, batch_size=batch)
    pixels, _, _, errors = decode_batch(blobs, embedder.input_size)
    assert not any(errors), "benchmark images must all decode"
    embedder.embed(pixels[:batch])  # trace/compile outside the timing, as the actor does
    start = time.perf_counter()
    embedder.embed(pixels)
    bare_s = time.perf_counter() - start

    embedder.model.predict(pixels[:1], verbose=0)
    start = time.perf_counter()
    for i in range(naive_n):
        embedder.model.predict(pixels[i : i + 1], verbose=0)
    naive_s = time.perf_counter() - start

    if record["failed"] or double["failed"]:
        raise RuntimeError(f"benchmark images failed: {record['failed']} + {double['failed']}")
    a = record["embedded"] / pipeline_s
    marginal = extra / (double_s - warm_s) if double_s > warm_s else float("nan")
    b = len(pixels) / bare_s
    c = naive_n / naive_s
    return {
        "backbone": backbone,
        "weights": weights,
        "source": sources[0].split("://", 1)[0] if "://" in sources[0] else "local",
        "images": n,
        "batch_size": batch,
        "tf_threads_per_actor": record["embedder"]["threads"],
        "pipeline_images_per_s": round(a, 2),
        "pipeline_seconds": round(pipeline_s, 2),
        "pipeline_warm_seconds": round(warm_s, 2),
        "pipeline_warm_2n_seconds": round(double_s, 2),
        "pipeline_marginal_images_per_s": round(marginal, 2),
        "bare_model_images_per_s": round(b, 2),
        "naive_predict_images_per_s": round(c, 2),
        "ratio_pipeline_to_bare": round(a / b, 3),
        "ratio_marginal_pipeline_to_bare": round(marginal / b, 3),
        "ratio_pipeline_to_naive": round(a / c, 3),
        "embedded": record["embedded"],
        "embedded_2n": double["embedded"],
        "failed": record["failed"] + double["failed"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet50"])
    p.add_argument("--images", type=int, default=960, help="images (a multiple of 12)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--naive", type=int, default=64, help="images for the per-image loop")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument(
        "--source",
        nargs="+",
        choices=["local", "s3"],
        default=["local"],
        help="read images from local disk, and/or from a SeaweedFS S3 server on 127.0.0.1",
    )
    p.add_argument("--threads", type=int, help="embed.threads (default: semclust's choice)")
    args = p.parse_args()

    import ray

    from semclust.demo import build_demo_images

    workdir = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    per_class = max(1, args.images // 12)
    folders = (workdir / "images", workdir / "images-2x")
    for folder, count, seed in zip(folders, (per_class, 2 * per_class), (1, 2), strict=True):
        build_demo_images(folder, per_class=count, seed=seed)
        shutil.rmtree(folder / "_unusable")  # only decodable images, so (a) and (b) see the same
    n = sum(1 for f in folders[0].rglob("*") if f.is_file() and f.suffix != ".txt")
    server = s3_sources = None
    if "s3" in args.source:
        # Before Ray starts: its workers read the credentials from the environment they start in.
        server, s3_sources = _images_on_s3(folders, workdir)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        for source in args.source:
            sources = s3_sources if source == "s3" else (str(folders[0]), str(folders[1]))
            for backbone in args.backbones:
                result = bench_backbone(
                    backbone, folders[0], sources, n, args.batch_size, args.naive, args.threads
                )
                result["date"] = time.strftime("%Y-%m-%d")
                result["cpus"] = args.num_cpus
                result["load_average_1m"] = round(os.getloadavg()[0], 1)
                print(json.dumps(result), flush=True)
    finally:
        ray.shutdown()
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _images_on_s3(folders: tuple[Path, ...], workdir: Path) -> tuple[object, tuple[str, ...]]:
    """Start SeaweedFS on loopback (tests/s3server.py), upload the folders, point AWS_* at it."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.s3server import ACCESS_KEY, SECRET_KEY, start_s3_server

    server = start_s3_server(workdir / "s3")
    os.environ.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_ENDPOINT_URL=server.endpoint,
        AWS_REGION="us-east-1",
    )
    from semclust import storage

    storage.forget_clients()  # new credentials in the environment
    client = server.client()
    client.create_bucket(Bucket="bench")
    uris = []
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                key = f"{folder.name}/{path.relative_to(folder)}"
                client.put_object(Bucket="bench", Key=key, Body=path.read_bytes())
        uris.append(f"s3://bench/{folder.name}/")
    return server, tuple(uris)


if __name__ == "__main__":
    main()
