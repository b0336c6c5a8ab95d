"""Embed fixed pixels with both backbones through semclust's ``Embedder`` on one Keras backend.

Run as a script, one process per backend, because Keras fixes its backend at the first import:

    python tests/embed/backend_embed.py --backend tensorflow --pixels P.npy --out DIR \
        --resnet-weights random --save-resnet-weights DIR/resnet50.weights.h5

Writes ``DIR/resnet50.npy``, ``DIR/efficientnet_lite0.npy`` (L2-normalised float32 features, as
the embed actors write them) and ``DIR/info.json`` (the backend Keras really used and the dtype
policy), which ``test_jax_backend`` compares across backends.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RESNET_SEED = 7
BATCH = 4  # smaller than the image count, so the padded last batch is compared too


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", required=True, choices=("tensorflow", "jax"))
    ap.add_argument("--pixels", required=True, help=".npy of uint8 (N, 224, 224, 3)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--resnet-weights", default="random")
    ap.add_argument("--save-resnet-weights", help="write the ResNet50's weights here (.weights.h5)")
    args = ap.parse_args(argv)

    # Imported after argument parsing only for speed of --help; the Embedder itself selects
    # the backend (configure_keras_backend) before Keras is first imported.
    from semclust.embed.backbones import Embedder

    pixels = np.load(args.pixels)
    args.out.mkdir(parents=True, exist_ok=True)
    # float32 on purpose: this compares backends, not precisions (auto is mixed on a GPU).
    common = {
        "batch_size": BATCH,
        "keras_backend": args.backend,
        "threads": 2,
        "precision": "float32",
    }

    resnet = Embedder("resnet50", args.resnet_weights, seed=RESNET_SEED, **common)
    np.save(args.out / "resnet50.npy", resnet.embed(pixels))
    if args.save_resnet_weights:
        # The keras.applications model inside the uint8 wrapper: exactly what
        # resnet50.build loads when embed.weights is a file.
        inner = resnet.model.get_layer("resnet50_embed").get_layer("resnet50")
        inner.save_weights(args.save_resnet_weights)

    lite0 = Embedder("efficientnet_lite0", "default", **common)
    np.save(args.out / "efficientnet_lite0.npy", lite0.embed(pixels))

    import keras

    info = {
        "backend": keras.backend.backend(),
        "dtype_policy": keras.config.dtype_policy().name,
    }
    (args.out / "info.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
