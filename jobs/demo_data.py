"""Ray job entrypoint: put the built-in demo image set into object storage.

The first step of ``jobs/demo_job.py``, the laptop overlay's entrypoint
(``kubernetes/overlays/kind``), so that a cluster with an empty object store has something to
embed; on its own:

    python jobs/demo_data.py --to s3://semclust-demo/images/ --per-class 20

The bucket is created when missing. The endpoint and credentials come from the standard AWS
variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from semclust import storage
from semclust.demo import build_demo_images


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo_data.py", description=__doc__.splitlines()[0])
    p.add_argument("--to", required=True, help="destination prefix, e.g. s3://bucket/images/")
    p.add_argument("--per-class", type=int, default=20, help="images per class (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--wait", type=float, default=120.0, help="seconds to wait for the store to answer"
    )
    return p


def _ensure_bucket(uri: str, wait: float) -> None:
    """Create the bucket of an s3:// URI if it is missing, waiting for a store still starting."""
    import s3fs

    bucket = urlparse(uri).netloc
    fs = s3fs.S3FileSystem(endpoint_url=storage.options().endpoint_url)
    deadline = time.monotonic() + wait
    while True:
        try:
            if not fs.exists(bucket):
                fs.mkdir(bucket)
            return
        except (OSError, ConnectionError) as exc:  # the store may still be starting
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot reach the object store for {uri}: {exc}") from exc
            time.sleep(2.0)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if urlparse(args.to).scheme == "s3":
        _ensure_bucket(args.to, args.wait)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_demo_images(root, per_class=args.per_class, seed=args.seed)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            storage.write_bytes(
                storage.join(args.to, path.relative_to(root).as_posix()), path.read_bytes()
            )
    print(f"uploaded {len(files)} demo files to {args.to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
