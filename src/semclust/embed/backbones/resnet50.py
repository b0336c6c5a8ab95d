"""ResNet50 (Keras applications), 2048-d average-pooled features.

ImageNet weights come from Keras' own download, cached under ``~/.keras/models``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from semclust.embed.backbones.spec import BackboneSpec

if TYPE_CHECKING:
    import keras

# Keras' ImageNet "caffe" preprocessing for ResNet50: BGR order, per-channel mean subtraction.
_BGR_MEAN = (103.939, 116.779, 123.68)

SPEC = BackboneSpec(
    name="resnet50",
    input_size=224,
    dim=2048,
    # The file and md5 keras.applications.ResNet50(weights="imagenet", include_top=False) uses.
    imagenet_url="https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
    "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    imagenet_hash="4d473c1dd8becc155b73f8504c6f6626",
)


def build(input_size: int, weights_file: str | None, seed: int) -> keras.Model:
    """ResNet50 taking float32 RGB in [0, 255] (N, S, S, 3) -> float32 (N, 2048)."""
    import keras

    if weights_file is None:
        keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_size, input_size, 3), dtype="float32", name="rgb")
    bgr = keras.ops.flip(inputs, axis=-1)
    x = bgr - keras.ops.convert_to_tensor(_BGR_MEAN, dtype="float32")
    base = keras.applications.ResNet50(
        include_top=False,
        weights=weights_file,
        input_shape=(input_size, input_size, 3),
        pooling="avg",
    )
    return keras.Model(inputs, base(x), name="resnet50_embed")
