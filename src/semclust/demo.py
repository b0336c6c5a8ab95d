"""The built-in demo: a labelled image set made from photos that ship with installed packages.

Each source photo (scikit-image's and scikit-learn's samples) is one class; its images are random
crops, flips, resizes and colour changes of it, saved as JPEG, PNG or WebP. A few unusable files
are added so the demo also shows how failures are recorded.
"""

from __future__ import annotations

import logging
import math
import shlex
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from semclust import storage
from semclust.rundir import layout

log = logging.getLogger(__name__)

# skimage/data files (shipped in the wheel, no download) and sklearn's two sample photos.
_SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
    "motorcycle_left.png",
    "camera.png",
    "coins.png",
)
_SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
# The demo scores its clusters against the photo each image was made from (its folder).
DEMO_STAGES = ("embed", "cluster", "graph", "index", "evaluate", "report")


def source_photos() -> dict[str, Path]:
    """Class name -> photo file, from the installed scikit-image and scikit-learn packages."""
    import skimage.data
    import sklearn.datasets

    sk_dir = Path(skimage.data.__file__).parent
    sl_dir = Path(sklearn.datasets.__file__).parent / "images"
    photos = {name.rsplit(".", 1)[0]: sk_dir / name for name in _SKIMAGE_PHOTOS}
    photos.update({name.rsplit(".", 1)[0]: sl_dir / name for name in _SKLEARN_PHOTOS})
    missing = [str(p) for p in photos.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"demo photos missing from the installed packages: {missing}")
    return photos


def augment(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random resized crop (35-100% of the area), maybe flipped, with colour jitter."""
    w, h = photo.size
    area = w * h * rng.uniform(0.35, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = min(w, round(math.sqrt(area * aspect)))
    ch = min(h, round(math.sqrt(area / aspect)))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    img = photo.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if img.mode == "RGB":
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))
    short = int(rng.integers(128, 321))
    scale = short / min(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))


def build_demo_images(out_dir: Path, per_class: int = 20, seed: int = 0) -> dict[str, int]:
    """Write ``out_dir/<class>/<class>-NNN.<ext>`` plus a few unusable files; returns counts."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for name, path in sorted(source_photos().items()):
        with Image.open(path) as src:
            photo = src.convert("L" if src.mode in ("L", "I", "I;16") else "RGB")
        class_dir = out_dir / name
        class_dir.mkdir(exist_ok=True)
        for i in range(per_class):
            img = augment(photo, rng)
            ext = ("jpg", "png", "webp")[i % 3]
            img.save(class_dir / f"{name}-{i:03d}.{ext}", quality=90)
        counts[name] = per_class
    unusable = out_dir / "_unusable"
    unusable.mkdir(exist_ok=True)
    (unusable / "empty.jpg").write_bytes(b"")
    good = (out_dir / "coffee" / "coffee-000.jpg").read_bytes()
    (unusable / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (unusable / "not-an-image.png").write_text("this is text, not a PNG\n")
    (out_dir / "README.txt").write_text("semclust demo images: one folder per source photo\n")
    return counts


def make_query_image(out_path: Path, class_name: str = "coffee", seed: int = 999) -> Path:
    """A fresh augmentation of one class's photo, not part of the demo set."""
    with Image.open(source_photos()[class_name]) as src:
        photo = src.convert("RGB")
    augment(photo, np.random.default_rng(seed)).save(out_path, quality=90)
    return out_path


def run_demo(
    out_dir: str | Path = "semclust-demo",
    per_class: int = 20,
    weights: str = "default",
    num_cpus: int | None = None,
) -> dict[str, Any]:
    """Build the demo set, run every stage with efficientnet_lite0, score and search it."""
    from semclust.config import load_config
    from semclust.index.search import SearchIndex
    from semclust.runner import run_stages

    out = Path(out_dir).resolve()
    counts = build_demo_images(out / "images", per_class=per_class)
    cfg = load_config(
        None,
        {
            "run_dir": str(out / "run"),
            "mode": "overwrite",
            "ray.num_cpus": num_cpus,
            "embed.input": str(out / "images"),
            "embed.backbone": "efficientnet_lite0",
            "embed.weights": weights,
            "embed.rows_per_part": 100,
            "cluster.k": len(counts),
            # A few restarts cost well under a second here and avoid a merged pair of classes.
            "cluster.nredo": 5,
            "graph.k": 10,
        },
    )
    # Scored before the report is built, so that the report shows the scores.
    records = run_stages(cfg, DEMO_STAGES, command="semclust demo")
    metrics = storage.read_json(storage.join(cfg.run_dir, layout.METRICS))
    query = make_query_image(out / "query-coffee.jpg")
    hits = SearchIndex(str(out / "run")).search_images([str(query)], k=5)[0]
    sizes = _cluster_sizes(str(out / "run"))
    return {
        "images_dir": str(out / "images"),
        "run_dir": str(out / "run"),
        "classes": len(counts),
        "stages": records,
        "metrics": metrics["kmeans"],
        "cluster_sizes": sizes,
        "query": str(query),
        "hits": [{"rank": h.rank, "uri": h.uri, "similarity": h.similarity} for h in hits],
        "serve_command": f"semclust serve --run-dir {shlex.quote(str(out / 'run'))}",
    }


def _cluster_sizes(run_dir: str) -> dict[int, int]:
    from semclust.rundir.embeddings import RunRows, read_clusters

    clusters = read_clusters(run_dir, layout.ASSIGNMENTS, RunRows.load(run_dir))
    ids, n = np.unique(clusters, return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, n, strict=True)}
