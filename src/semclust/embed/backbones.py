"""Backbone registry: name -> how to build a Keras 3 embedding model.

Every backbone model built here takes a batch of RGB images as ``uint8`` (N, S, S, 3) and returns
pooled features ``float32`` (N, D). Scaling and mean subtraction happen inside the model, so they
run on the accelerator and the decode tasks ship compact uint8 pixels.

Keras itself is imported only inside the builders: the registry is read by config validation on
the driver, which must not pay for (or pin the backend of) a Keras import.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

# Keras' ImageNet "caffe" preprocessing for ResNet50: BGR order, per-channel mean subtraction.
_RESNET50_BGR_MEAN = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    input_size: int
    dim: int
    default_weights: str
    build: Callable[[int, str, int], keras.Model]  # (input_size, weights, seed) -> float model


def configure_keras_backend(backend: str) -> None:
    """Select the Keras backend; must happen before the first ``import keras`` in a process."""
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend:
            raise RuntimeError(
                f"Keras is already loaded with the {keras.backend.backend()!r} backend in this "
                f"process; cannot switch to {backend!r}"
            )
        return
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _weights_file(weights: str) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights {weights!r} is neither a known setting nor an existing file; use "
            "'imagenet', 'random', 'default', or a path to a weights file"
        )
    return path


def _resnet50(input_size: int, weights: str, seed: int) -> keras.Model:
    import keras

    if weights.endswith(".keras"):
        return keras.saving.load_model(_weights_file(weights), compile=False)
    inputs = keras.Input((input_size, input_size, 3), dtype="float32", name="rgb")
    bgr = keras.ops.flip(inputs, axis=-1)
    x = bgr - keras.ops.convert_to_tensor(_RESNET50_BGR_MEAN, dtype="float32")
    if weights == "random":
        keras.utils.set_random_seed(seed)
        keras_weights = None
    elif weights in ("imagenet", "default"):
        keras_weights = "imagenet"
    else:
        keras_weights = str(_weights_file(weights))
    try:
        base = keras.applications.ResNet50(
            include_top=False,
            weights=keras_weights,
            input_shape=(input_size, input_size, 3),
            pooling="avg",
        )
    except Exception as exc:
        if keras_weights == "imagenet":
            raise RuntimeError(
                "could not get Keras' ImageNet weights for resnet50 (download or cache failed: "
                f"{type(exc).__name__}: {exc}). On a machine without internet, stage the file "
                "'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5' and pass its path as "
                "embed.weights, or use the efficientnet_lite0 backbone"
            ) from exc
        raise
    return keras.Model(inputs, base(x), name="resnet50_embed")


def _efficientnet_lite0(input_size: int, weights: str, seed: int) -> keras.Model:
    import keras

    from semclust.embed import efficientnet_lite

    if weights.endswith(".keras"):
        return keras.saving.load_model(_weights_file(weights), compile=False)
    if weights in ("default", "imagenet"):
        return efficientnet_lite.efficientnet_lite0(input_size, weights="default")
    if weights == "random":
        keras.utils.set_random_seed(seed)
        return efficientnet_lite.efficientnet_lite0(input_size, weights=None)
    path = _weights_file(weights)
    if path.suffix == ".pth":
        return efficientnet_lite.efficientnet_lite0(input_size, weights=str(path))
    model = efficientnet_lite.efficientnet_lite0(input_size, weights=None)
    model.load_weights(str(path))
    return model


BACKBONES: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec("resnet50", 224, 2048, "imagenet", _resnet50),
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite0", 224, 1280, "default", _efficientnet_lite0
    ),
}


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))}"
        ) from None


def build_embedding_model(
    name: str, weights: str, input_size: int | None = None, seed: int = 0
) -> keras.Model:
    """A model mapping uint8 RGB (N, S, S, 3) to float32 features (N, D) for a named backbone."""
    import keras

    spec = get_backbone(name)
    size = input_size or spec.input_size
    inner = spec.build(size, weights, seed)
    inputs = keras.Input((size, size, 3), dtype="uint8", name="pixels")
    features = inner(keras.ops.cast(inputs, "float32"))
    return keras.Model(inputs, features, name=f"{name}_uint8")


PRECISIONS = ("auto", "float32", "mixed")


def _configure_tensorflow(threads: int | None) -> bool:
    """Thread counts on CPU, memory growth on GPU; returns whether TF sees a GPU.

    Must run before TF executes its first op, so it happens before the model is built.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    try:
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError as exc:  # TF already initialised in this process: keep its settings
        log.debug("TensorFlow already initialised, threading unchanged: %s", exc)
    return bool(gpus)


class Embedder:
    """One backbone model and its batched call; built once per actor (or per search process).

    ``embed(pixels)`` takes uint8 (N, S, S, 3) and returns float32 (N, D); batches smaller than
    ``batch_size`` are padded so the compiled graph is traced once. ``precision="auto"`` uses
    mixed float16 (Keras' dtype policy) on a GPU and float32 on CPU; ``xla`` compiles the
    TensorFlow call with XLA (``None``: on GPU only).
    """

    def __init__(
        self,
        backbone: str,
        weights: str,
        input_size: int | None = None,
        batch_size: int = 32,
        normalize: bool = True,
        seed: int = 0,
        keras_backend: str = "tensorflow",
        threads: int | None = None,
        precision: str = "auto",
        xla: bool | None = None,
        weights_sha256: str | None = None,
    ) -> None:
        from semclust.embed.weights import local_weights

        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}; choose one of {', '.join(PRECISIONS)}")
        configure_keras_backend(keras_backend)
        self.spec = get_backbone(backbone)
        weights = local_weights(weights, weights_sha256)
        on_gpu = _configure_tensorflow(threads) if keras_backend == "tensorflow" else False
        import keras

        mixed = precision == "mixed" or (precision == "auto" and on_gpu)
        keras.config.set_dtype_policy("mixed_float16" if mixed else "float32")
        self.input_size = input_size or self.spec.input_size
        self.batch_size = batch_size
        self.normalize = normalize
        self.model = build_embedding_model(backbone, weights, self.input_size, seed)
        self.dim = int(self.model.output_shape[-1])
        self._call = self.model.predict_on_batch
        if keras_backend == "tensorflow" and (xla if xla is not None else on_gpu):
            import tensorflow as tf

            compiled = tf.function(lambda x: self.model(x, training=False), jit_compile=True)
            self._call = lambda x: compiled(x).numpy()
        log.info(
            "embedder %s: dim %d, %s, %s",
            backbone,
            self.dim,
            "GPU" if on_gpu else "CPU",
            "mixed float16" if mixed else "float32",
        )

    def embed(self, pixels: Any) -> Any:
        import numpy as np

        pixels = np.asarray(pixels, dtype=np.uint8)
        n = len(pixels)
        out = np.empty((n, self.dim), dtype=np.float32)
        for start in range(0, n, self.batch_size):
            chunk = pixels[start : start + self.batch_size]
            m = len(chunk)
            if m < self.batch_size:
                pad = np.zeros((self.batch_size - m, *chunk.shape[1:]), dtype=np.uint8)
                chunk = np.concatenate([chunk, pad])
            feats = np.asarray(self._call(chunk), dtype=np.float32)[:m]
            out[start : start + m] = feats
        if self.normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out /= np.maximum(norms, 1e-12)
        return out
