"""What the clustering heads (SCAN in ``scan``, DEC in ``dec``) share: the Keras set-up, the
trained head's interface, batched inference, per-epoch logs, and top-two assignments."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_PREDICT_BATCH = 8192


def prepare_keras(seed: int, threads: int | None = None) -> None:
    """Seed Python, NumPy and the backend; give TensorFlow ``threads`` CPU threads.

    Must run before the process's first TensorFlow op (thread settings are fixed after it); a
    GPU, when TensorFlow sees one, gets memory growth so that FAISS can share it.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        try:
            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)
            if threads:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
        except RuntimeError as exc:  # already initialised in this process: keep its settings
            log.debug("TensorFlow already initialised: %s", exc)
    keras.utils.set_random_seed(seed)


@dataclass
class HeadResult:
    """A trained head: ``predict(rows float32 (n, d)) -> probabilities float32 (n, k)``."""

    predict: Callable[[np.ndarray], np.ndarray]
    summary: dict[str, Any] = field(default_factory=dict)
    # SCAN only: every head before self-labelling, rows -> float32 (n, heads, k)
    predict_heads: Callable[[np.ndarray], np.ndarray] | None = None


def predict_in_batches(model: Any, features: np.ndarray, batch: int = _PREDICT_BATCH) -> np.ndarray:
    """``model`` on float32 rows (n, d) in inference mode, chunk by chunk: float32 (n, ...)."""
    outs = [
        np.asarray(model(np.ascontiguousarray(features[s : s + batch]), training=False))
        for s in range(0, len(features), batch)
    ]
    return np.concatenate(outs).astype(np.float32, copy=False)


def top_two(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(clusters int64 (n, 2), distances float32 (n, 2)) from probabilities float (n, k).

    The two most probable clusters, most probable first; distance = 1 - probability.
    """
    order = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    p = np.take_along_axis(probs, order, axis=1)
    return order.astype(np.int64), (1.0 - p).astype(np.float32)


class EpochLog:
    """Keras callback collecting each epoch's logs (rounded) and logging a line."""

    def __init__(self, name: str) -> None:
        import keras

        outer = self
        self.epochs: list[dict[str, float]] = []

        class Callback(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                row = {key: round(float(v), 5) for key, v in (logs or {}).items()}
                outer.epochs.append(row)
                log.info("%s epoch %d: %s", name, epoch + 1, row)

        self.callback = Callback()
