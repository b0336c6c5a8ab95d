"""A run of real photos for the labelling tests, embedded in-process with efficientnet_lite0.

The demo set's 12 photo classes (6 images each) are embedded with the real backbone (no Ray:
the label stage reads files, not memory), clustered and graphed in the stages' own formats.
Reference images are fresh augmentations of 8 of the classes; the other 4 are "unrelated".
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from semclust.embed.actors import EmbedderSpec
from tests.label.runs import make_run

REF_CLASSES = (
    "astronaut",
    "chelsea",
    "china",
    "coffee",
    "flower",
    "motorcycle_left",
    "retina",
    "rocket",
)
UNRELATED = ("camera", "coins", "hubble_deep_field", "ihc")
REFS_PER_CLASS = 3

SPEC = EmbedderSpec(
    backbone="efficientnet_lite0",
    weights="default",
    input_size=224,
    resize="center_crop",
    batch_size=16,
    normalize=True,
    seed=0,
    keras_backend="tensorflow",
)


@pytest.fixture(scope="session")
def embedder():
    return SPEC.build()


def _embed_files(embedder, paths: list[Path]) -> np.ndarray:
    from semclust.embed.decode import decode_image

    pixels = [decode_image(p.read_bytes(), SPEC.input_size, SPEC.resize).pixels for p in paths]
    return embedder.embed(np.stack(pixels))


@pytest.fixture(scope="session")
def photo_run(demo_images, embedder, tmp_path_factory) -> tuple[Path, list[str], np.ndarray]:
    """(run dir, class of each row, image ids) for the 72 demo photos."""
    paths = sorted(p for p in demo_images.glob("*/*") if p.parent.name != "_unusable")
    x = _embed_files(embedder, paths)
    run = tmp_path_factory.mktemp("label-run") / "run"
    uris = [f"file://{p}" for p in paths]
    ids = make_run(run, x, 12, rows_per_part=30, knn_k=5, uris=uris, embedder=asdict(SPEC))
    return run, [p.parent.name for p in paths], ids


@pytest.fixture(scope="session")
def refs_dir(tmp_path_factory) -> Path:
    """3 fresh augmentations (seeds unlike the demo set's) of each of 8 classes."""
    from PIL import Image

    from semclust.demo import augment, source_photos

    root = tmp_path_factory.mktemp("refs")
    photos = source_photos()
    rng = np.random.default_rng(2024)
    for name in REF_CLASSES:
        (root / name).mkdir()
        with Image.open(photos[name]) as src:
            photo = src.convert("RGB")
        for i in range(REFS_PER_CLASS):
            augment(photo, rng).save(root / name / f"ref-{i}.jpg", quality=90)
    return root
