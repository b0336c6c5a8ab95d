from __future__ import annotations

import numpy as np
import pytest

from semclust.embed.backbones import BACKBONES, Embedder, get_backbone


def _pixels(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_registry_and_unknown_backbone():
    assert set(BACKBONES) >= {"resnet50", "efficientnet_lite0"}
    assert get_backbone("resnet50").dim == 2048
    assert get_backbone("efficientnet_lite0").dim == 1280
    with pytest.raises(ValueError, match="unknown backbone 'vgg'; choose one of"):
        get_backbone("vgg")


@pytest.fixture(scope="module")
def resnet_random():
    return Embedder("resnet50", "random", batch_size=4, seed=7)


def test_resnet50_shape_normalised_and_batch_independent(resnet_random):
    x = _pixels(5)
    out = resnet_random.embed(x)
    assert out.shape == (5, 2048) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    # Padding the last partial batch must not change a row's embedding.
    np.testing.assert_allclose(resnet_random.embed(x[:1]), out[:1], rtol=1e-4, atol=1e-5)
    assert not np.allclose(out[0], out[1])


def test_random_weights_are_seeded(resnet_random):
    again = Embedder("resnet50", "random", batch_size=4, seed=7)
    x = _pixels(2, seed=1)
    np.testing.assert_allclose(again.embed(x), resnet_random.embed(x), rtol=1e-5, atol=1e-6)


def test_resnet50_weights_from_file(resnet_random, tmp_path):
    # The user path for staged ImageNet weights: a weights file instead of Keras' download.
    inner = resnet_random.model.layers[-1]
    path = tmp_path / "resnet50_notop.weights.h5"
    inner.get_layer("resnet50").save_weights(path)
    loaded = Embedder("resnet50", str(path), batch_size=4, seed=99)
    x = _pixels(3, seed=2)
    np.testing.assert_allclose(loaded.embed(x), resnet_random.embed(x), rtol=1e-4, atol=1e-5)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a known setting nor an existing file"):
        Embedder("resnet50", str(tmp_path / "nope.h5"))


def test_no_normalise_keeps_raw_features():
    emb = Embedder("efficientnet_lite0", "default", batch_size=2, normalize=False)
    out = emb.embed(_pixels(2, seed=3))
    assert out.shape == (2, 1280)
    assert not np.allclose(np.linalg.norm(out, axis=1), 1.0)
    assert (out >= 0).all()  # pooled ReLU6 features
