"""Ray's batch-inference recipe with semclust's model: the baseline (b) of embed_throughput.py.

What a user would copy from Ray Data's batch-inference docs, nothing tuned:
``read_images(size=(224, 224), mode="RGB")`` -> ``map_batches(callable class,
batch_size=64, compute=ActorPoolStrategy(size=1))`` -> ``write_parquet``. The callable class
builds the same Keras model semclust's actors build (``Embedder``, L2-normalised, the same
weights), so the only difference to ``semclust embed`` is the pipeline around the model.

    python benchmarks/embed_recipe.py --input DIR_OR_S3_URI --out DIR \
        --backbone efficientnet_lite0 --weights default [--num-cpus 2]

For an ``s3://`` input the images are read through a pyarrow ``S3FileSystem`` pointed at
``AWS_ENDPOINT_URL`` with ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (as the docs show
for a custom endpoint). Prints one JSON line: rows written and the seconds inside the process.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

BATCH_SIZE = 64


class EmbedImages:
    """The docs' "callable class": the model is built once per actor, then called per batch."""

    def __init__(self, backbone: str, weights: str) -> None:
        from semclust.embed.backbones import Embedder

        # threads left to TensorFlow (one per core), as a plain Keras model would have them.
        self.embedder = Embedder(backbone, weights, batch_size=BATCH_SIZE)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"path": batch["path"], "embedding": self.embedder.embed(batch["image"])}


def s3_filesystem() -> Any:
    """A pyarrow S3FileSystem for the endpoint and credentials in the environment."""
    from pyarrow import fs

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    scheme, _, host = endpoint.partition("://")
    return fs.S3FileSystem(
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        endpoint_override=host,
        scheme=scheme,
        region=os.environ.get("AWS_REGION", "us-east-1"),
    )


def run_recipe(source: str, out: str, backbone: str, weights: str, num_cpus: int | None) -> dict:
    import ray

    start = time.perf_counter()
    # address="local": a Ray of this process's own, as `semclust embed` starts one (a bare
    # ray.init() would join any other cluster running on the machine).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    started = time.perf_counter()
    filesystem = None
    if source.startswith("s3://"):
        filesystem = s3_filesystem()
        source = source[len("s3://") :]  # pyarrow's filesystems take bucket/key paths
    ds = ray.data.read_images(
        source, size=(224, 224), mode="RGB", include_paths=True, filesystem=filesystem
    )
    ds = ds.map_batches(
        EmbedImages,
        fn_constructor_args=(backbone, weights),
        batch_size=BATCH_SIZE,
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    ds.write_parquet(out)
    done = time.perf_counter()
    ray.shutdown()
    return {
        "rows": parquet_rows(out),
        "ray_init_seconds": round(started - start, 2),
        "pipeline_seconds": round(done - started, 2),
    }


def parquet_rows(folder: str) -> int:
    """Rows in the Parquet files under ``folder`` (from their footers)."""
    import pyarrow.parquet as pq

    return sum(
        pq.read_metadata(os.path.join(root, name)).num_rows
        for root, _, names in os.walk(folder)
        for name in names
        if name.endswith(".parquet")
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", required=True, help="image folder or s3:// prefix")
    p.add_argument("--out", required=True, help="output folder for the Parquet files")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="default")
    p.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default: all)")
    args = p.parse_args()
    result = run_recipe(args.input, args.out, args.backbone, args.weights, args.num_cpus)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
