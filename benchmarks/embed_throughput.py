"""Embedding throughput: the full semclust pipeline vs the bare model vs a naive predict loop.

On the same images and batch size, in one run (the machine is noisy, so only ratios within one
run are compared):
  (a) pipeline: ``run_embed`` end to end (listing, Ray Data read + decode tasks, the actor pool,
      committing Parquet shards), actor start-up included;
  (b) bare model: ``Embedder.embed`` on pre-decoded uint8 batches in this process;
  (c) naive: ``model.predict`` called once per image.
Prints one JSON object per backbone.

    python benchmarks/embed_throughput.py --backbones efficientnet_lite0 resnet50 --images 960
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


def bench_backbone(
    backbone: str, images: Path, source: str, n: int, batch: int, naive_n: int
) -> dict:
    """``source`` is the URI the pipeline reads (the local folder or its copy on S3)."""
    from semclust.config import load_config
    from semclust.embed.backbones import Embedder
    from semclust.embed.decode import decode_batch
    from semclust.embed.pipeline import list_images, run_embed

    weights = _weights_for(backbone)
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{backbone}-"))
    cfg = load_config(
        None,
        {
            "run_dir": str(run_dir),
            "mode": "overwrite",
            "embed.rows_per_part": 10_000,
            "embed.input": source,
            "embed.backbone": backbone,
            "embed.weights": weights,
            "embed.batch_size": batch,
        },
    )
    start = time.perf_counter()
    record = run_embed(cfg)
    pipeline_s = time.perf_counter() - start
    shutil.rmtree(run_dir, ignore_errors=True)

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

    a = record["embedded"] / pipeline_s
    b = len(pixels) / bare_s
    c = naive_n / naive_s
    return {
        "backbone": backbone,
        "weights": weights,
        "source": source.split("://", 1)[0] if "://" in source else "local",
        "images": n,
        "batch_size": batch,
        "pipeline_images_per_s": round(a, 2),
        "pipeline_seconds": round(pipeline_s, 2),
        "bare_model_images_per_s": round(b, 2),
        "naive_predict_images_per_s": round(c, 2),
        "ratio_pipeline_to_bare": round(a / b, 3),
        "ratio_pipeline_to_naive": round(a / c, 3),
        "embedded": record["embedded"],
        "failed": record["failed"],
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
        choices=["local", "s3"],
        default="local",
        help="read images from local disk, or from a SeaweedFS S3 server started on 127.0.0.1",
    )
    args = p.parse_args()

    import ray

    from semclust.demo import build_demo_images

    workdir = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    images = workdir / "images"
    build_demo_images(images, per_class=max(1, args.images // 12), seed=1)
    shutil.rmtree(images / "_unusable")  # only decodable images, so (a) and (b) see the same
    n = sum(1 for f in images.rglob("*") if f.is_file() and f.suffix != ".txt")
    server = None
    source = str(images)
    if args.source == "s3":
        server, source = _images_on_s3(images, workdir)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        for backbone in args.backbones:
            result = bench_backbone(backbone, images, source, n, args.batch_size, args.naive)
            result["date"] = time.strftime("%Y-%m-%d")
            result["cpus"] = args.num_cpus
            print(json.dumps(result), flush=True)
    finally:
        ray.shutdown()
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _images_on_s3(images: Path, workdir: Path) -> tuple[object, str]:
    """Start SeaweedFS on loopback (tests/s3server.py), upload the images, point AWS_* at it."""
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

    storage.configure_s3(storage.s3_options_from_env())
    client = server.client()
    client.create_bucket(Bucket="bench")
    for path in sorted(images.rglob("*")):
        if path.is_file():
            client.put_object(
                Bucket="bench", Key=f"images/{path.relative_to(images)}", Body=path.read_bytes()
            )
    return server, "s3://bench/images/"


if __name__ == "__main__":
    main()
