"""The embedding model of a backbone and its batched call (``Embedder``).

Every model built here takes a batch of RGB images as ``uint8`` (N, S, S, 3) and returns pooled
features ``float32`` (N, D). Scaling and mean subtraction happen inside the model, so they run on
the accelerator and the decode tasks ship compact uint8 pixels.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from semclust.config import PRECISIONS
from semclust.embed.backbones.spec import backbone_module, get_backbone, resolve_weights

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)


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


def build_embedding_model(
    name: str,
    weights: str,
    input_size: int | None = None,
    seed: int = 0,
    weights_sha256: str | None = None,
) -> keras.Model:
    """A model mapping uint8 RGB (N, S, S, 3) to float32 features (N, D) for a named backbone.

    ``weights`` is an ``embed.weights`` setting (``resolve_weights``); a ``.keras`` file is a
    whole saved model taking float32 RGB in [0, 255], used as the backbone as it is.
    """
    import keras

    module = backbone_module(name)
    size = input_size or module.SPEC.input_size
    weights_file = resolve_weights(module.SPEC, weights, weights_sha256)
    if weights_file is not None and weights_file.endswith(".keras"):
        inner = keras.saving.load_model(weights_file, compile=False)
    else:
        inner = module.build(size, weights_file, seed)
    inputs = keras.Input((size, size, 3), dtype="uint8", name="pixels")
    features = inner(keras.ops.cast(inputs, "float32"))
    return keras.Model(inputs, features, name=f"{name}_uint8")


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


def _jax_on_gpu() -> bool:
    """Whether JAX runs on a GPU (its default backend), for ``precision="auto"``."""
    import jax

    return jax.default_backend() == "gpu"


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
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}; choose one of {', '.join(PRECISIONS)}")
        configure_keras_backend(keras_backend)
        self.spec = get_backbone(backbone)
        if keras_backend == "tensorflow":
            on_gpu = _configure_tensorflow(threads)
        else:
            # Without this, "auto" meant float32 (and the log said CPU) on a GPU under JAX.
            on_gpu = keras_backend == "jax" and _jax_on_gpu()
        import keras

        mixed = precision == "mixed" or (precision == "auto" and on_gpu)
        keras.config.set_dtype_policy("mixed_float16" if mixed else "float32")
        self.input_size = input_size or self.spec.input_size
        self.batch_size = batch_size
        self.normalize = normalize
        self.model = build_embedding_model(backbone, weights, self.input_size, seed, weights_sha256)
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
        """L2-normalised (unless ``normalize=False``) features float32 (N, D) of uint8 pixels
        (N, S, S, 3)."""
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
