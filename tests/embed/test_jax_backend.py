"""Keras on the JAX backend embeds real photos like TensorFlow does, for both backbones, through
semclust's own ``Embedder`` (the embed actors' path).

Keras picks its backend once per process, so each backend runs in its own subprocess
(``backend_embed.py``) on the same decoded pixels. Seeded random weights differ between
backends (each draws from its own RNG), so the TensorFlow run saves its ResNet50 weights to a
``.weights.h5`` file and the JAX run loads that file as ``embed.weights``; EfficientNet-Lite0
loads its packaged ImageNet weights in both.

Tolerances: both runs are float32 on CPU and differ only in kernels and summation order
(oneDNN vs XLA:CPU). On the unit-length embeddings, the largest per-image L2 difference seen was
1.9e-7 (ResNet50) and 1.5e-6 (Lite0), and the largest element difference 2e-8 / 4e-7. We allow
1e-4 for both: 60-500x headroom for other CPUs' instruction sets, yet 600x below the closest
two different photos under the random ResNet50 (0.067 apart) and 10,000x below under Lite0
(1.2), so an image mix-up, wrong weights, or preprocessing or padding that differs between the
backends fail. The dot product (cosine) must exceed 1 - 1e-5: seen 1 - 6e-8, float32 rounding of
the row norms; for unit vectors it is 1 - d^2/2, kept as the number people compare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from semclust.embed.decode import decode_batch

pytestmark = pytest.mark.slow

HELPER = Path(__file__).with_name("backend_embed.py")
N_IMAGES = 6  # not a multiple of the helper's batch of 4: the padded batch is compared too
MAX_L2_DIFF = 1e-4
MIN_COSINE = 1 - 1e-5
DIMS = {"resnet50": 2048, "efficientnet_lite0": 1280}


def _run(backend: str, pixels: Path, out: Path, *extra: str) -> dict[str, np.ndarray]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("KERAS_BACKEND", None)  # the Embedder must select it, as in the actors
    cmd = [sys.executable, str(HELPER), "--backend", backend, "--pixels", str(pixels)]
    proc = subprocess.run(
        [*cmd, "--out", str(out), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{backend} run failed:\n{proc.stderr[-4000:]}"
    info = json.loads((out / "info.json").read_text())
    # Guards against both runs silently landing on the same backend.
    assert info == {"backend": backend, "dtype_policy": "float32"}
    return {name: np.load(out / f"{name}.npy") for name in DIMS}


@pytest.fixture(scope="module")
def embeddings(demo_images, tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    """{backend: {backbone: (N, D) features}} for the same N real photos."""
    # One JPEG per source photo: different pictures, not crops of one.
    files = sorted(demo_images.glob("*/*-000.jpg"))[:N_IMAGES]
    assert len(files) == N_IMAGES
    pixels, _, _, errors = decode_batch([f.read_bytes() for f in files], 224)
    assert errors == [""] * N_IMAGES
    tmp = tmp_path_factory.mktemp("jax-backend")
    px = tmp / "pixels.npy"
    np.save(px, pixels)
    weights = tmp / "resnet50.weights.h5"
    tf_out = _run("tensorflow", px, tmp / "tf", "--save-resnet-weights", str(weights))
    assert weights.is_file()
    jax_out = _run("jax", px, tmp / "jax", "--resnet-weights", str(weights))
    return {"tensorflow": tf_out, "jax": jax_out}


@pytest.mark.parametrize("backbone", sorted(DIMS))
def test_jax_embeddings_match_tensorflow(embeddings, backbone):
    tf = embeddings["tensorflow"][backbone].astype(np.float64)
    jx = embeddings["jax"][backbone].astype(np.float64)
    assert tf.shape == jx.shape == (N_IMAGES, DIMS[backbone])
    assert np.isfinite(jx).all()
    np.testing.assert_allclose(np.linalg.norm(jx, axis=1), 1.0, rtol=1e-5)

    diff = np.linalg.norm(tf - jx, axis=1)
    cosine = np.sum(tf * jx, axis=1)
    assert diff.max() < MAX_L2_DIFF, f"per-image L2 differences {diff}"
    assert np.abs(tf - jx).max() < MAX_L2_DIFF
    assert cosine.min() > MIN_COSINE, f"cosines {cosine}"

    # The photos must be told apart far more clearly than the backends differ, or the match
    # above proves nothing (e.g. a constant output on both).
    between = np.linalg.norm(tf[:, None] - tf[None], axis=-1)[~np.eye(N_IMAGES, dtype=bool)]
    assert diff.max() < 0.01 * between.min(), (diff.max(), between.min())
