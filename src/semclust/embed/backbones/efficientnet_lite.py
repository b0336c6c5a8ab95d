"""The EfficientNet-Lite architecture in Keras 3, and loading ``efficientnet_pytorch``-style
state_dicts into it (the backbone module ``efficientnet_lite0`` uses both).

The network is built from ``keras.layers`` only, so it runs on the TensorFlow and the JAX
backends. The packaged Lite0 weights are a legacy ``torch.save`` file in the
``efficientnet_pytorch`` naming, read without torch by
:func:`semclust.embed.backbones.torch_legacy.load_legacy_state_dict`.

Lite differs from EfficientNet-B0 in: no squeeze-excitation, ReLU6 instead of swish, and
(for wider variants) a stem and head that are not rescaled; the block list is B0's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers

logger = logging.getLogger(__name__)

__all__ = ["EMBEDDING_DIM", "build_efficientnet_lite0", "load_efficientnet_lite0_weights"]

EMBEDDING_DIM = 1280
NUM_CLASSES = 1000
_BN_EPSILON = 1e-3
_STEM_CHANNELS = 32

# (expand_ratio, kernel, stride, repeats, out_channels): EfficientNet-B0's stages.
_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (6, 3, 2, 2, 24),
    (6, 5, 2, 2, 40),
    (6, 3, 2, 3, 80),
    (6, 5, 1, 3, 112),
    (6, 5, 2, 4, 192),
    (6, 3, 1, 1, 320),
)


@dataclass(frozen=True)
class _Block:
    index: int
    in_ch: int
    out_ch: int
    expand_ratio: int
    kernel: int
    stride: int


def _blocks() -> list[_Block]:
    """The 16 MBConv blocks in order, numbered like ``_blocks.N`` in the checkpoint."""
    out: list[_Block] = []
    in_ch = _STEM_CHANNELS
    for expand, kernel, stride, repeats, out_ch in _STAGES:
        for r in range(repeats):
            # Only the first block of a stage strides and changes width.
            out.append(_Block(len(out), in_ch, out_ch, expand, kernel, stride if r == 0 else 1))
            in_ch = out_ch
    return out


def _layer_map(include_top: bool) -> list[tuple[str, str, str]]:
    """(keras layer name, checkpoint prefix, kind) for every layer that carries weights."""
    entries = [("stem_conv", "_conv_stem", "conv"), ("stem_bn", "_bn0", "bn")]
    for b in _blocks():
        p, t = f"blocks_{b.index}_", f"_blocks.{b.index}."
        if b.expand_ratio != 1:
            entries += [(p + "expand_conv", t + "_expand_conv", "conv")]
            entries += [(p + "expand_bn", t + "_bn0", "bn")]
        entries += [
            (p + "dwconv", t + "_depthwise_conv", "dwconv"),
            (p + "dw_bn", t + "_bn1", "bn"),
            (p + "project_conv", t + "_project_conv", "conv"),
            (p + "project_bn", t + "_bn2", "bn"),
        ]
    entries += [("head_conv", "_conv_head", "conv"), ("head_bn", "_bn1", "bn")]
    if include_top:
        entries.append(("predictions", "_fc", "dense"))
    return entries


def _bn(name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(epsilon=_BN_EPSILON, name=name)


def _relu6(name: str) -> layers.ReLU:
    return layers.ReLU(max_value=6.0, name=name)


def build_efficientnet_lite0(
    input_size: int = 224, include_top: bool = False, initializer: str = "glorot_uniform"
) -> keras.Model:
    """Build an (unweighted) EfficientNet-Lite0.

    Args:
        input_size: side S of the square input.
        include_top: add the 1000-way ImageNet classifier.
        initializer: Keras initializer of the conv and dense kernels. ``"zeros"`` when weights
            are loaded next: on the JAX backend every random kernel shape is an XLA compile
            (about 30 s of CPU for this model), all wasted when the values are overwritten.

    Returns:
        A ``keras.Model`` taking float32 RGB images in [0, 255] of shape (None, S, S, 3); it
        normalises them itself as (x - 127) / 128. Output: the global-average-pooled features,
        float32 (None, 1280); with ``include_top``, raw ImageNet logits (None, 1000), no softmax.
    """
    if input_size < 32:
        raise ValueError(f"input_size must be at least 32 (five stride-2 stages), got {input_size}")
    inputs = keras.Input(shape=(input_size, input_size, 3), dtype="float32", name="image")
    # Normalisation inside the model so it runs on the accelerator with the rest.
    x = layers.Rescaling(scale=1.0 / 128.0, offset=-127.0 / 128.0, name="rescale")(inputs)
    init = {"kernel_initializer": initializer}
    # padding="same" is TF SAME (pads bottom/right more), matching the TF-trained weights.
    x = layers.Conv2D(
        _STEM_CHANNELS, 3, strides=2, padding="same", use_bias=False, name="stem_conv", **init
    )(x)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_relu")(x)

    for b in _blocks():
        p = f"blocks_{b.index}_"
        shortcut = x
        if b.expand_ratio != 1:
            x = layers.Conv2D(
                b.in_ch * b.expand_ratio,
                1,
                padding="same",
                use_bias=False,
                name=p + "expand_conv",
                **init,
            )(x)
            x = _bn(p + "expand_bn")(x)
            x = _relu6(p + "expand_relu")(x)
        x = layers.DepthwiseConv2D(
            b.kernel,
            strides=b.stride,
            padding="same",
            use_bias=False,
            name=p + "dwconv",
            depthwise_initializer=initializer,
        )(x)
        x = _bn(p + "dw_bn")(x)
        x = _relu6(p + "dw_relu")(x)
        x = layers.Conv2D(
            b.out_ch, 1, padding="same", use_bias=False, name=p + "project_conv", **init
        )(x)
        x = _bn(p + "project_bn")(x)
        # Linear bottleneck: no activation after the projection.
        if b.stride == 1 and b.in_ch == b.out_ch:
            x = layers.Add(name=p + "add")([x, shortcut])

    x = layers.Conv2D(EMBEDDING_DIM, 1, padding="same", use_bias=False, name="head_conv", **init)(x)
    x = _bn("head_bn")(x)
    x = _relu6("head_relu")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = layers.Dense(NUM_CLASSES, name="predictions", **init)(x)
    return keras.Model(inputs, x, name="efficientnet_lite0")


def _take(state_dict: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in state_dict:
        raise ValueError(f"state_dict lacks tensor {key!r}")
    arr = np.asarray(state_dict[key])
    if arr.shape != shape:
        raise ValueError(f"tensor {key!r} has shape {arr.shape}, expected {shape}")
    return arr.astype(np.float32, copy=False)


def load_efficientnet_lite0_weights(
    model: keras.Model, state_dict: Mapping[str, np.ndarray]
) -> None:
    """Copy an ``efficientnet_pytorch``-style Lite0 state_dict into a model from
    :func:`build_efficientnet_lite0`, in place.

    Expected keys (float32 arrays, PyTorch layouts): ``_conv_stem.weight`` (32, 3, 3, 3),
    ``_bn0.{weight,bias,running_mean,running_var}``, per block N in 0..15
    ``_blocks.N._expand_conv.weight`` (out, in, 1, 1; absent for block 0),
    ``_blocks.N._bn0.*`` (after expand), ``_blocks.N._depthwise_conv.weight`` (C, 1, k, k),
    ``_blocks.N._bn1.*``, ``_blocks.N._project_conv.weight``, ``_blocks.N._bn2.*``,
    ``_conv_head.weight`` (1280, 320, 1, 1), ``_bn1.*``, and ``_fc.{weight,bias}``
    ((1000, 1280), (1000,)), the latter used only when the model has the classifier.
    ``*.num_batches_tracked`` is ignored.

    Conv kernels are transposed (out, in, kh, kw) -> (kh, kw, in, out), depthwise
    (C, 1, kh, kw) -> (kh, kw, C, 1), dense (out, in) -> (in, out).

    Raises:
        ValueError: a tensor is missing or mis-shaped (named), the state_dict holds tensors
            this model does not use, or the model lacks one of the expected layers.
    """
    layer_names = {layer.name for layer in model.layers}
    include_top = "predictions" in layer_names
    used: set[str] = set()
    # Validate everything before assigning anything, so a bad state_dict leaves the model as is.
    assignments: list[tuple[keras.layers.Layer, list[np.ndarray]]] = []
    for layer_name, prefix, kind in _layer_map(include_top):
        if layer_name not in layer_names:
            raise ValueError(f"model has no layer {layer_name!r}: not an EfficientNet-Lite0")
        layer = model.get_layer(layer_name)
        expected = [tuple(w.shape) for w in layer.weights]
        if kind == "bn":
            keys = [prefix + s for s in (".weight", ".bias", ".running_mean", ".running_var")]
            # Keras order: gamma, beta, moving_mean, moving_variance.
            values = [_take(state_dict, k, shp) for k, shp in zip(keys, expected, strict=True)]
        elif kind == "conv":
            kh, kw, cin, cout = expected[0]
            keys = [prefix + ".weight"]
            values = [_take(state_dict, keys[0], (cout, cin, kh, kw)).transpose(2, 3, 1, 0)]
        elif kind == "dwconv":
            kh, kw, ch, mult = expected[0]
            keys = [prefix + ".weight"]
            values = [_take(state_dict, keys[0], (ch * mult, 1, kh, kw)).transpose(2, 3, 0, 1)]
        else:  # dense
            (cin, cout), (nbias,) = expected
            keys = [prefix + ".weight", prefix + ".bias"]
            values = [
                _take(state_dict, keys[0], (cout, cin)).T,
                _take(state_dict, keys[1], (nbias,)),
            ]
        assignments.append((layer, [np.ascontiguousarray(v) for v in values]))
        used.update(keys)

    ignored = {k for k in state_dict if k.endswith(".num_batches_tracked")}
    if not include_top:
        ignored |= {k for k in state_dict if k.startswith("_fc.")}
    unused = sorted(set(state_dict) - used - ignored)
    if unused:
        raise ValueError(
            f"state_dict has {len(unused)} tensors this model does not use, e.g. {unused[:5]} "
            "(is it EfficientNet-Lite0, without squeeze-excitation?)"
        )
    for layer, values in assignments:
        layer.set_weights(values)
    logger.debug("loaded %d tensors into %s", len(used), model.name)
