"""The parts of the embed pipeline alone, for embed_throughput.py: (c) the bare model, (d) decode.

    python benchmarks/embed_parts.py bare --images DIR --backbone resnet50 --weights random
    python benchmarks/embed_parts.py decode --images DIR [--processes 2]

``bare``: ``Embedder.embed`` on batches decoded beforehand (uint8, 224 x 224, squashed as the
benchmark's pipelines do), whole batches only, timed after one warm-up batch, in this process;
no Ray.

``decode``: images per second of ``semclust.embed.decode.decode_batch`` over the files' bytes,
on one core and on a multiprocessing pool of ``--processes`` workers (default: all cores); then,
on one core, other routes and the two halves of the work, to see where the time goes: the JPEG
decode alone and the resize alone (Pillow), Ray's ``read_images`` work (full decode + bilinear
resize), and simplejpeg (libjpeg-turbo; when installed: ``pip install simplejpeg``, not a
semclust dependency) at full size and scaled (``min_height``/``min_width``: libjpeg-turbo scales
by eighths, where Pillow's ``draft`` only halves, so for a 500 x 375 JPEG bound for 224 x 224
Pillow decodes at full size: 375 / 2 < 224), each followed by the same bicubic resize.

Each prints one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SIZE = 224
RESIZE = "squash"  # what Ray's read_images(size=...) does; semclust's default is center_crop
TARGET_PER_CORE = 300  # images/s one core should decode + resize (issue #13)


def read_blobs(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".jpg"]


def bare_model(
    folder: Path, backbone: str, weights: str, batch: int, threads: int | None, repeats: int
) -> dict:
    import numpy as np

    from semclust.embed.backbones import Embedder
    from semclust.embed.decode import decode_batch

    pixels, _, _, errors = decode_batch(read_blobs(folder), SIZE, RESIZE)
    if any(errors):
        raise RuntimeError(f"benchmark images failed to decode: {sorted(set(errors))[:3]}")
    # Whole batches only (the images repeated): a padded last batch would count the model's
    # work on padding against the images, which matters when N is a batch or two.
    whole = -(-len(pixels) // batch) * batch
    pixels = np.resize(pixels, (whole, *pixels.shape[1:]))
    start = time.perf_counter()
    embedder = Embedder(backbone, weights, batch_size=batch, threads=threads)
    embedder.embed(pixels[:batch])  # build + trace outside the timing, as an actor does
    build_s = time.perf_counter() - start
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        embedder.embed(pixels)
        rates.append(len(pixels) / (time.perf_counter() - start))
    return {
        "part": "bare_model",
        "backbone": backbone,
        "weights": weights,
        "images_timed": len(pixels),
        "batch_size": batch,
        "tf_threads": threads,
        "build_and_first_batch_seconds": round(build_s, 2),
        "images_per_s_each": [round(r, 2) for r in rates],
        "images_per_s": round(sum(rates) / len(rates), 2),
    }


def _decode_chunk(blobs: list[bytes]) -> int:
    from semclust.embed.decode import decode_batch

    _, _, _, errors = decode_batch(blobs, SIZE, RESIZE)
    return sum(1 for e in errors if not e)


def _rate(fn: Callable[[Any], Any], items: list[Any], repeats: int) -> float:
    """Best of ``repeats`` passes, images per second (the best pass is the least disturbed)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = max(best, len(items) / (time.perf_counter() - start))
    return round(best, 1)


def one_core_routes(blobs: list[bytes], repeats: int) -> dict[str, float]:
    """Images per second on one core by other routes than ``decode_batch``, and of its two
    halves (the JPEG decode, the resize), to see where the time goes."""
    import numpy as np
    from PIL import Image

    from semclust.embed.decode import decode_image

    def pillow_full_decode(blob: bytes) -> Image.Image:
        with Image.open(io.BytesIO(blob)) as im:
            im.load()
            return im

    def as_ray_read_images(blob: bytes) -> Any:  # what read_images(size=, mode="RGB") does
        with Image.open(io.BytesIO(blob)) as im:
            return np.asarray(im.resize((SIZE, SIZE), Image.BILINEAR).convert("RGB"))

    def bicubic(im: Image.Image) -> Any:  # semclust's resize (squash)
        return np.asarray(im.resize((SIZE, SIZE), Image.BICUBIC, reducing_gap=3.0))

    def bilinear(im: Image.Image) -> Any:
        return np.asarray(im.resize((SIZE, SIZE), Image.BILINEAR, reducing_gap=3.0))

    decoded = [pillow_full_decode(b) for b in blobs]
    rates = {
        "semclust_decode_image_squash": _rate(
            lambda b: decode_image(b, SIZE, "squash"), blobs, repeats
        ),
        "semclust_decode_image_center_crop": _rate(
            lambda b: decode_image(b, SIZE, "center_crop"), blobs, repeats
        ),
        "pillow_full_decode_only": _rate(pillow_full_decode, blobs, repeats),
        "pillow_bicubic_resize_only": _rate(bicubic, decoded, repeats),
        "pillow_bilinear_resize_only": _rate(bilinear, decoded, repeats),
        "pillow_as_ray_read_images": _rate(as_ray_read_images, blobs, repeats),
    }
    try:
        import simplejpeg
    except ImportError:
        return rates

    def sj(blob: bytes, scaled: bool, fast: bool = False) -> Any:
        # scaled: the smallest libjpeg-turbo scale (k/8) that keeps both sides >= SIZE
        return simplejpeg.decode_jpeg(
            blob,
            "RGB",
            fastdct=fast,
            fastupsample=fast,
            min_height=SIZE if scaled else 0,
            min_width=SIZE if scaled else 0,
        )

    rates["simplejpeg_full_decode_only"] = _rate(lambda b: sj(b, False), blobs, repeats)
    rates["simplejpeg_scaled_decode_only"] = _rate(lambda b: sj(b, True), blobs, repeats)
    for name, scaled, fast in (
        ("full", False, False),
        ("scaled", True, False),
        ("scaled_fast", True, True),
    ):
        rates[f"simplejpeg_{name}_then_bicubic"] = _rate(
            lambda b, s=scaled, f=fast: bicubic(Image.fromarray(sj(b, s, f))), blobs, repeats
        )
    rates["simplejpeg_full_then_bilinear"] = _rate(
        lambda b: bilinear(Image.fromarray(sj(b, False))), blobs, repeats
    )
    return rates


def decode_rates(folder: Path, processes: int, repeats: int, routes_images: int = 300) -> dict:
    from semclust.embed.decode import decode_batch

    blobs = read_blobs(folder)
    chunks = [blobs[i : i + 32] for i in range(0, len(blobs), 32)]
    # _rate counts items: here chunks of 32, so scale back to images
    per_chunk = _rate(lambda c: decode_batch(c, SIZE, RESIZE), chunks, repeats)
    one_core = round(per_chunk * len(blobs) / len(chunks), 1)
    with Pool(processes) as pool:
        pool.map(_decode_chunk, chunks[: processes * 2])  # workers started and warm
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            decoded = sum(pool.map(_decode_chunk, chunks))
            best = max(best, len(blobs) / (time.perf_counter() - start))
    if decoded != len(blobs):
        raise RuntimeError(f"only {decoded} of {len(blobs)} images decoded")
    routes = one_core_routes(blobs[:routes_images], repeats)
    sizes = _jpeg_sizes(blobs)
    return {
        "part": "decode",
        "images": len(blobs),
        "image_sizes": sizes,
        "mean_file_kib": round(sum(map(len, blobs)) / len(blobs) / 1024, 1),
        "resize": RESIZE,
        "size": SIZE,
        "processes": processes,
        "decode_batch_one_core_images_per_s": one_core,
        "decode_batch_all_cores_images_per_s": round(best, 1),
        "one_core_images_per_s_by_route": routes,
        "target_one_core_images_per_s": TARGET_PER_CORE,
        "semclust_meets_target": one_core >= TARGET_PER_CORE,
        "simplejpeg_installed": "simplejpeg_scaled_then_bicubic" in routes,
        "routes_images": min(routes_images, len(blobs)),
    }


def _jpeg_sizes(blobs: list[bytes]) -> dict[str, int]:
    """How many images of each width x height (the benchmark's are about 500 x 375)."""
    from PIL import Image

    counts: dict[str, int] = {}
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as im:
            key = f"{im.width}x{im.height}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:5])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    bare = sub.add_parser("bare", help="(c) the model alone on decoded batches")
    bare.add_argument("--images", type=Path, required=True, help="folder of .jpg files")
    bare.add_argument("--backbone", default="efficientnet_lite0")
    bare.add_argument("--weights", default="default")
    bare.add_argument("--batch-size", type=int, default=64)
    bare.add_argument("--threads", type=int, help="TF intra-op threads (default: TF's own)")
    bare.add_argument("--repeats", type=int, default=2)
    dec = sub.add_parser("decode", help="(d) decode alone")
    dec.add_argument("--images", type=Path, required=True, help="folder of .jpg files")
    dec.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    dec.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if args.part == "bare":
        result = bare_model(
            args.images, args.backbone, args.weights, args.batch_size, args.threads, args.repeats
        )
    else:
        result = decode_rates(args.images, args.processes, args.repeats)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
