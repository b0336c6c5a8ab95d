"""Fashion-MNIST from Debian's `dataset-fashion-mnist`, as PNG objects in a local S3 server.

Shared by the quality benchmark and the large S3 embedding run: the 70,000 images (60k train +
10k test, in that order) become ``s3://BUCKET/fmnist/<class>/<index>.png``, and a labels file
``s3://BUCKET/fmnist-labels.parquet`` holds ``uri,label`` for evaluation.
"""

from __future__ import annotations

import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fmnist_data import CLASSES, load_fashion_mnist  # noqa: E402


def start_server(data_dir: Path):
    """SeaweedFS on loopback with the AWS_* variables pointed at it (tests/s3server.py)."""
    from tests.s3server import ACCESS_KEY, SECRET_KEY, start_s3_server

    server = start_s3_server(data_dir)
    os.environ.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_ENDPOINT_URL=server.endpoint,
        AWS_REGION="us-east-1",
    )
    from semclust import storage

    storage.forget_clients()  # the S3 settings above come from the environment set here
    return server


def upload_fmnist(server, bucket: str, limit: int | None = None, threads: int = 16) -> int:
    """Write the images as PNG objects (skipped when already there) and the labels file."""
    import pyarrow as pa
    from PIL import Image

    from semclust import storage

    images, labels = load_fashion_mnist()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    client = server.client()
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
    keys = [f"fmnist/{CLASSES[y]}/{i:05d}.png" for i, y in enumerate(labels)]
    labels_uri = f"s3://{bucket}/fmnist-labels.parquet"
    if storage.exists(labels_uri) and storage.read_parquet(labels_uri).num_rows == len(keys):
        return len(keys)

    def put(i: int) -> None:
        buf = io.BytesIO()
        Image.fromarray(images[i], mode="L").save(buf, "PNG")
        client.put_object(Bucket=bucket, Key=keys[i], Body=buf.getvalue())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, range(len(keys))))
    table = pa.table(
        {
            "uri": [f"s3://{bucket}/{k}" for k in keys],
            "label": [CLASSES[y] for y in labels],
        }
    )
    storage.write_parquet(labels_uri, table)  # written last: marks the upload complete
    return len(keys)
