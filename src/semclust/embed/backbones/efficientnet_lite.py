"""The EfficientNet-Lite architecture (Lite0, Lite1, Lite2) in Keras 3, and loading
``efficientnet_pytorch``-style state_dicts into it (the backbone modules ``efficientnet_lite0``,
``efficientnet_lite1`` and ``efficientnet_lite2`` use both).

The network is built from ``keras.layers`` only, so it runs on the TensorFlow and the JAX
backends. The packaged weights are legacy ``torch.save`` files in the ``efficientnet_pytorch``
naming, read without torch by
:func:`semclust.embed.backbones.torch_legacy.load_legacy_state_dict`.

Lite differs from EfficientNet-B0 in: no squeeze-excitation, ReLU6 instead of swish, and a
stem (32 channels), head (1280) and first and last stage's repeats that are not rescaled in the
wider and deeper variants; the block list is B0's, scaled by the variant's width and depth
multipliers as the TensorFlow reference (``efficientnet_lite_builder``) scales it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDING_DIM",
    "VARIANTS",
    "LiteVariant",
    "build_efficientnet_lite",
    "build_efficientnet_lite0",
    "load_efficientnet_lite0_weights",
    "load_efficientnet_lite_weights",
]

EMBEDDING_DIM = 1280
NUM_CLASSES = 1000
_BN_EPSILON = 1e-3
_STEM_CHANNELS = 32
_CHANNEL_DIVISOR = 8

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
class LiteVariant:
    """One member of the family: its width and depth multipliers and native input side."""

    name: str
    width: float
    depth: float
    input_size: int


# The multipliers of the TensorFlow reference's ``efficientnet_lite_params``.
VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        LiteVariant("efficientnet_lite0", 1.0, 1.0, 224),
        LiteVariant("efficientnet_lite1", 1.0, 1.1, 240),
        LiteVariant("efficientnet_lite2", 1.1, 1.2, 260),
    )
}


@dataclass(frozen=True)
class _Block:
    index: int
    in_ch: int
    out_ch: int
    expand_ratio: int
    kernel: int
    stride: int


def _round_filters(channels: int, width: float) -> int:
    """Channels scaled by ``width``, rounded to a multiple of 8 and never more than 10% down."""
    if width == 1.0:
        return channels
    scaled = channels * width
    d = _CHANNEL_DIVISOR
    rounded = max(d, int(scaled + d / 2) // d * d)
    if rounded < 0.9 * scaled:
        rounded += d
    return rounded


def _variant(name: str) -> LiteVariant:
    if name not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; one of {sorted(VARIANTS)}")
    return VARIANTS[name]


def _blocks(variant: LiteVariant) -> list[_Block]:
    """The MBConv blocks in order, numbered like ``_blocks.N`` in the checkpoint (16 in Lite0,
    21 in Lite1 and Lite2)."""
    out: list[_Block] = []
    in_ch = _STEM_CHANNELS
    last = len(_STAGES) - 1
    for stage, (expand, kernel, stride, repeats, out_ch) in enumerate(_STAGES):
        out_ch = _round_filters(out_ch, variant.width)
        if stage not in (0, last):  # Lite keeps the first and last stage at one block
            repeats = math.ceil(variant.depth * repeats)
        for r in range(repeats):
            # Only the first block of a stage strides and changes width.
            out.append(_Block(len(out), in_ch, out_ch, expand, kernel, stride if r == 0 else 1))
            in_ch = out_ch
    return out


def _layer_map(variant: LiteVariant, include_top: bool) -> list[tuple[str, str, str]]:
    """(keras layer name, checkpoint prefix, kind) for every layer that carries weights."""
    entries = [("stem_conv", "_conv_stem", "conv"), ("stem_bn", "_bn0", "bn")]
    for b in _blocks(variant):
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
    """Build an (unweighted) EfficientNet-Lite0: :func:`build_efficientnet_lite` of Lite0."""
    return build_efficientnet_lite("efficientnet_lite0", input_size, include_top, initializer)


def build_efficientnet_lite(
    variant: str = "efficientnet_lite0",
    input_size: int | None = None,
    include_top: bool = False,
    initializer: str = "glorot_uniform",
) -> keras.Model:
    """Build an (unweighted) EfficientNet-Lite of the named variant.

    Args:
        variant: a name in :data:`VARIANTS` (``efficientnet_lite0`` / ``1`` / ``2``); the model
            carries it as its name, which is how the weight loader knows the block list.
        input_size: side S of the square input; None: the variant's own (224 / 240 / 260).
        include_top: add the 1000-way ImageNet classifier.
        initializer: Keras initializer of the conv and dense kernels. ``"zeros"`` when weights
            are loaded next: on the JAX backend every random kernel shape is an XLA compile
            (about 30 s of CPU for this model), all wasted when the values are overwritten.

    Returns:
        A ``keras.Model`` taking float32 RGB images in [0, 255] of shape (None, S, S, 3); it
        normalises them itself as (x - 127) / 128. Output: the global-average-pooled features,
        float32 (None, 1280); with ``include_top``, raw ImageNet logits (None, 1000), no softmax.
    """
    spec = _variant(variant)
    input_size = spec.input_size if input_size is None else input_size
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

    for b in _blocks(spec):
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
    return keras.Model(inputs, x, name=spec.name)


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
    """:func:`load_efficientnet_lite_weights` for a Lite0 model."""
    load_efficientnet_lite_weights(model, state_dict)


def load_efficientnet_lite_weights(
    model: keras.Model, state_dict: Mapping[str, np.ndarray]
) -> None:
    """Copy an ``efficientnet_pytorch``-style EfficientNet-Lite state_dict into a model from
    :func:`build_efficientnet_lite`, in place; the model's name says which variant it is.

    For Lite0 (Lite1 and Lite2 have blocks 0..20 and their own widths):

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
    variant = _variant(model.name)
    layer_names = {layer.name for layer in model.layers}
    include_top = "predictions" in layer_names
    used: set[str] = set()
    # Validate everything before assigning anything, so a bad state_dict leaves the model as is.
    assignments: list[tuple[keras.layers.Layer, list[np.ndarray]]] = []
    for layer_name, prefix, kind in _layer_map(variant, include_top):
        if layer_name not in layer_names:
            raise ValueError(f"model has no layer {layer_name!r}: not an {variant.name}")
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
            f"(is it {variant.name}, without squeeze-excitation?)"
        )
    for layer, values in assignments:
        layer.set_weights(values)
    logger.debug("loaded %d tensors into %s", len(used), model.name)
