from __future__ import annotations

import dataclasses
import hashlib
import uuid
from pathlib import Path

import numpy as np
import pytest

from semclust import registry
from semclust.embed.backbones import Embedder, get_backbone, resolve_weights
from semclust.embed.backbones import resnet50 as resnet50_module
from semclust.embed.backbones.efficientnet_lite0 import default_weights_path


def _pixels(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_registry_and_unknown_backbone():
    assert set(registry.backbone_names()) >= {"resnet50", "efficientnet_lite0"}
    for name in registry.backbone_names():
        assert get_backbone(name).name == name  # each module's SPEC is the one registered
    assert get_backbone("resnet50").dim == 2048
    assert get_backbone("efficientnet_lite0").dim == 1280
    with pytest.raises(ValueError, match="unknown backbone 'vgg'; choose one of"):
        get_backbone("vgg")


def test_one_weights_resolver_for_every_backbone(tmp_path):
    lite0, resnet = get_backbone("efficientnet_lite0"), get_backbone("resnet50")
    packaged = default_weights_path()
    assert resolve_weights(lite0, "default") == packaged
    assert resolve_weights(lite0, "imagenet") == packaged  # its packaged weights are ImageNet's
    assert resolve_weights(lite0, "random") is None and resolve_weights(resnet, "random") is None
    local = tmp_path / "w.weights.h5"
    local.write_bytes(b"x")
    assert resolve_weights(resnet, str(local)) == str(local)
    for spec in (lite0, resnet):
        with pytest.raises(FileNotFoundError, match="neither a known setting nor an existing"):
            resolve_weights(spec, str(tmp_path / "nope.h5"))


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


def test_imagenet_goes_through_keras_download_and_its_hash_check(resnet_random, tmp_path):
    """``imagenet`` is Keras' cached, hash-checked download; here its origin is a local file."""
    inner = resnet_random.model.layers[-1]
    source = tmp_path / f"semclust-test-{uuid.uuid4().hex}.weights.h5"
    inner.get_layer("resnet50").save_weights(source)
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    spec = dataclasses.replace(
        get_backbone("resnet50"), imagenet_url=f"file://{source}", imagenet_hash=md5
    )
    cached = Path(resolve_weights(spec, "imagenet"))  # in Keras' cache (~/.keras/models)
    try:
        assert cached != source and cached.name == source.name
        assert cached.read_bytes() == source.read_bytes()
        assert resolve_weights(spec, "default") == str(cached)  # resnet50 ships no weights
        model = resnet50_module.build(224, str(cached), seed=99)
        x = _pixels(2, seed=4).astype(np.float32)
        np.testing.assert_allclose(model(x), inner(x), rtol=1e-4, atol=1e-4)
        wrong = dataclasses.replace(spec, imagenet_hash="0" * 32)
        with pytest.raises(RuntimeError, match="stage the file"):
            resolve_weights(wrong, "imagenet")
    finally:
        cached.unlink(missing_ok=True)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a known setting nor an existing file"):
        Embedder("resnet50", str(tmp_path / "nope.h5"))


def test_keras_weights_and_whole_saved_model_for_efficientnet_lite0(tmp_path):
    random = Embedder("efficientnet_lite0", "random", input_size=96, batch_size=2, seed=3)
    inner = random.model.layers[-1]
    weights = tmp_path / "lite0.weights.h5"
    inner.save_weights(weights)
    whole = tmp_path / "lite0.keras"
    inner.save(whole)
    x = _pixels(2, size=96, seed=5)
    expected = random.embed(x)
    for path in (weights, whole):
        loaded = Embedder("efficientnet_lite0", str(path), input_size=96, batch_size=2, seed=0)
        np.testing.assert_allclose(loaded.embed(x), expected, rtol=1e-4, atol=1e-5)


def test_no_normalise_keeps_raw_features():
    emb = Embedder("efficientnet_lite0", "default", batch_size=2, normalize=False)
    out = emb.embed(_pixels(2, seed=3))
    assert out.shape == (2, 1280)
    assert not np.allclose(np.linalg.norm(out, axis=1), 1.0)
    assert (out >= 0).all()  # pooled ReLU6 features
