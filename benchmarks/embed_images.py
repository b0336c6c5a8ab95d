"""The benchmark images of embed_throughput.py, on local disk and on a loopback S3 server.

About 500 x 375 JPEGs (a fifth portrait) cut from the colour photos scikit-learn ships (and
scikit-image's, when it is installed): random crops, flips, brightness and JPEG quality, seeded,
so every file differs but a run can be repeated.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


def _photos() -> list[Any]:
    """The colour photos installed with scikit-learn (always) and scikit-image (if present)."""
    from sklearn.datasets import load_sample_image

    photos = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]
    try:
        import skimage.data as data
    except ImportError:
        return photos
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina"):
        try:  # some need a download, which is not possible here: skip those
            image = getattr(data, name)()
        except Exception:
            continue
        if image.ndim == 3 and image.shape[2] == 3:
            photos.append(image)
    return photos


def make_images(folder: Path, count: int, seed: int = 13) -> list[Path]:
    """``count`` distinct JPEGs of about 500 x 375 (a fifth of them portrait), seeded."""
    import numpy as np
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in _photos()]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        w, h = photo.size
        portrait = rng.random() < 0.2
        aspect = 0.75 if portrait else 4 / 3  # width / height of the crop
        side = rng.uniform(0.5, 1.0)  # of the largest crop with that aspect
        cw = int(min(w, h * aspect) * side)
        ch = int(cw / aspect)
        left, top = int(rng.integers(w - cw + 1)), int(rng.integers(h - ch + 1))
        out_w = int(rng.integers(480, 521))
        size = (out_w, round(out_w * 0.75)) if not portrait else (round(out_w * 0.75), out_w)
        im = photo.crop((left, top, left + cw, top + ch)).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.8, 1.2))
        path = folder / f"img_{i:05d}.jpg"
        im.save(path, "JPEG", quality=int(rng.integers(70, 96)))
        paths.append(path)
    return paths


def image_sets(workdir: Path, sizes: set[int]) -> dict[int, Path]:
    """A folder per image count, each the first ``n`` of one generated pool (hard links)."""
    pool = make_images(workdir / "pool", max(sizes))
    folders = {}
    for n in sorted(sizes):
        folder = workdir / f"images-{n}"
        folder.mkdir()
        for path in pool[:n]:
            os.link(path, folder / path.name)
        folders[n] = folder
    return folders


def upload_to_s3(workdir: Path, folders: dict[int, Path]) -> tuple[Any, dict[str, str], dict]:
    """Start SeaweedFS on loopback as the tests do, upload every folder; (server, env, URIs)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
    from tests.s3server import ACCESS_KEY, SECRET_KEY, start_s3_server

    server = start_s3_server(workdir / "s3")
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_REGION": "us-east-1",
    }
    client = server.client()
    client.create_bucket(Bucket="bench")
    uris = {}
    for n, folder in folders.items():
        for path in sorted(folder.iterdir()):
            client.put_object(
                Bucket="bench", Key=f"{folder.name}/{path.name}", Body=path.read_bytes()
            )
        uris[n] = f"s3://bench/{folder.name}/"
    return server, env, uris
