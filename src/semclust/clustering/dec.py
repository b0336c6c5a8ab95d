"""DEC on frozen embeddings (Xie et al., 2016): a clustering layer trained to sharpen itself.

Rows z (the embeddings in k-means model space, optionally through a trainable linear encoder
initialised to the identity) are softly assigned to k centroids, initialised from the k-means
model, with Student's t kernel::

    q_ij ∝ (1 + |z_i - mu_j|^2 / alpha) ^ -(alpha + 1) / 2

and trained to minimise KL(P || Q) against the sharpened target ``p_ij ∝ q_ij^2 / f_j`` (f_j =
sum_i q_ij, the soft cluster size, which keeps a large cluster from absorbing the rest). P is
recomputed from the current model every ``dec_update_interval`` steps (one epoch by default),
in one streamed pass that also gives each row's hard cluster; training stops when fewer than
``dec_tolerance`` of the rows changed cluster since the previous update, or after
``dec_max_epochs`` passes.

Distances are measured in units of the k-means model's root mean squared distance of a row to
its nearest centroid (the rows are divided by it), so that the Student's t kernel sees a
within-cluster row at distance about 1 whatever the embedding's scale. A cluster can end with
no rows assigned (its soft size stays positive, so nothing divides by zero); that is reported,
never an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from semclust.clustering.heads import EpochLog, HeadResult, predict_in_batches

if TYPE_CHECKING:
    from semclust.config import RefineConfig

log = logging.getLogger(__name__)

_PASS_BATCH = 8192
_SCALE_SAMPLE = 20_000  # rows on which the distance unit is measured
_FREQ_FLOOR = 1e-6  # relative floor on a soft cluster size in the target distribution


def student_t(z: np.ndarray, centroids: np.ndarray, alpha: float) -> np.ndarray:
    """Soft assignments float32 (n, k) of rows float (n, d) to centroids float (k, d)."""
    z = np.asarray(z, dtype=np.float64)
    mu = np.asarray(centroids, dtype=np.float64)
    d2 = np.maximum((z * z).sum(1)[:, None] + (mu * mu).sum(1)[None, :] - 2 * z @ mu.T, 0.0)
    # In log space: the kernel's power underflows for far rows when alpha is small.
    logits = -(alpha + 1) / 2 * np.log1p(d2 / alpha)
    logits -= logits.max(axis=1, keepdims=True)
    q = np.exp(logits)
    return (q / q.sum(axis=1, keepdims=True)).astype(np.float32)


def target_distribution(q: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """DEC's target float32 (n, k): ``q^2 / f`` per column, rows normalised.

    ``freq`` float (k,) is the soft cluster size over all rows (not just this batch); it is
    floored at a tiny fraction of the total so an emptied cluster does not divide by zero.
    """
    f = np.maximum(np.asarray(freq, dtype=np.float64), _FREQ_FLOOR * max(float(freq.sum()), 1.0))
    p = np.asarray(q, dtype=np.float64) ** 2 / f
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def build_dec_model(dim: int, centroids: np.ndarray, alpha: float, encoder: bool) -> Any:
    """A Keras model: rows float32 (n, d) -> soft assignments float32 (n, k)."""
    import keras
    from keras import layers, ops

    k = len(centroids)

    class DecModel(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="dec")
            self.encoder = (
                layers.Dense(dim, kernel_initializer="identity", bias_initializer="zeros")
                if encoder
                else None
            )
            self.centroids = self.add_weight(
                shape=(k, dim),
                initializer=keras.initializers.Constant(np.asarray(centroids, np.float32)),
                name="centroids",
            )

        def call(self, x: Any, training: bool = False) -> Any:
            z = self.encoder(x) if self.encoder is not None else x
            d2 = (
                ops.sum(z * z, axis=1, keepdims=True)
                + ops.sum(self.centroids * self.centroids, axis=1)[None, :]
                - 2 * ops.matmul(z, ops.transpose(self.centroids))
            )
            logits = -(alpha + 1) / 2 * ops.log1p(ops.maximum(d2, 0.0) / alpha)
            return ops.softmax(logits, axis=-1)

    model = DecModel()
    model(np.zeros((2, dim), dtype=np.float32))
    return model


def distance_unit(features: np.ndarray, centroids: np.ndarray, seed: int) -> float:
    """Root mean squared distance of sample rows (n, d) to their nearest centroid (k, d)."""
    n = len(features)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, _SCALE_SAMPLE), replace=False))
    z = np.asarray(features[rows], dtype=np.float64)
    mu = np.asarray(centroids, dtype=np.float64)
    d2 = np.maximum((z * z).sum(1)[:, None] + (mu * mu).sum(1)[None, :] - 2 * z @ mu.T, 0.0)
    unit = float(np.sqrt(d2.min(axis=1).mean()))
    return unit if unit > 0 else 1.0


def _soft_pass(
    predict: Callable[[np.ndarray], np.ndarray], features: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(hard clusters int32 (n,), soft sizes float64 (k,)) of every row, chunk by chunk."""
    labels = np.empty(len(features), dtype=np.int32)
    freq = np.zeros(k, dtype=np.float64)
    for s in range(0, len(features), _PASS_BATCH):
        q = predict(features[s : s + _PASS_BATCH])
        labels[s : s + len(q)] = np.argmax(q, axis=1)
        freq += q.sum(axis=0, dtype=np.float64)
    return labels, freq


def train_dec(features: np.ndarray, centroids: np.ndarray, rc: RefineConfig) -> HeadResult:
    """Train DEC on rows float32 (n, d) from k-means centroids float32 (k, d).

    Returns the predict function (rows -> soft assignments (n, k)) and a summary with the loss
    curve (one entry per target update: mean KL, fraction of rows that changed cluster),
    whether it converged, and the distance unit.
    """
    import keras

    n, dim = features.shape
    k = len(centroids)
    if n < k:
        raise ValueError(f"DEC needs at least k rows: {n} rows for k={k}")
    keras.utils.set_random_seed(rc.seed)
    rng = np.random.default_rng(rc.seed)
    unit = distance_unit(features, centroids, rc.seed)
    model = build_dec_model(dim, np.asarray(centroids) / unit, rc.dec_alpha, rc.dec_encoder)
    # Plain SGD with momentum, as in the paper: weight decay would shrink the centroids.
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=rc.dec_learning_rate, momentum=0.9),
        loss=keras.losses.KLDivergence(),
    )
    batch = min(rc.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    interval = rc.dec_update_interval or steps_per_epoch
    max_updates = max(1, int(np.ceil(rc.dec_max_epochs * steps_per_epoch / interval)))

    def predict(x: np.ndarray) -> np.ndarray:
        return predict_in_batches(model, np.asarray(x, dtype=np.float32) / unit)

    curve: list[dict[str, Any]] = []
    loss: float | None = None
    previous: np.ndarray | None = None
    converged = False
    for update in range(max_updates + 1):
        labels, freq = _soft_pass(predict, features, k)
        changed = float(np.mean(labels != previous)) if previous is not None else None
        sizes = np.bincount(labels, minlength=k)
        entry: dict[str, Any] = {
            "update": update,
            "changed": None if changed is None else round(changed, 6),
            "empty_clusters": int((sizes == 0).sum()),
        }
        if loss is not None:
            entry["loss"] = round(loss, 6)
        curve.append(entry)
        log.info("dec update %d: %s", update, entry)
        if changed is not None and changed < rc.dec_tolerance:
            converged = True
            break
        if update == max_updates:
            break
        previous = labels
        # The targets stay fixed until the next update: computed from a copy of the weights.
        frozen = _FrozenDec(model, unit, rc.dec_alpha, freq)
        loss = _fit_to_targets(model, features, frozen, batch, interval, rng)
    summary = {
        "converged": converged,
        "updates": len(curve) - 1,
        "distance_unit": round(unit, 6),
        "update_interval_steps": interval,
        "batch_size": batch,
        "encoder": rc.dec_encoder,
        "empty_clusters": curve[-1]["empty_clusters"],
        "loss_curve": {"dec": curve},
    }
    return HeadResult(predict=predict, summary=summary)


def _fit_to_targets(
    model: Any,
    features: np.ndarray,
    frozen: _FrozenDec,
    batch: int,
    steps: int,
    rng: np.random.Generator,
) -> float:
    """Train ``model`` for ``steps`` batches against ``frozen``'s targets; the last mean KL."""
    import tensorflow as tf

    dim = features.shape[1]
    k = frozen.centroids.shape[0]

    def make_epoch() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for rows in _row_stream(features, batch, steps, rng):
            yield rows / frozen.unit, frozen.targets(rows)

    dataset = tf.data.Dataset.from_generator(
        make_epoch,
        output_signature=(
            tf.TensorSpec((None, dim), tf.float32),
            tf.TensorSpec((None, k), tf.float32),
        ),
    ).prefetch(2)
    epoch_log = EpochLog("dec")
    model.fit(
        dataset,
        epochs=1,
        steps_per_epoch=steps,
        verbose=0,
        shuffle=False,
        callbacks=[epoch_log.callback],
    )
    return float(epoch_log.epochs[-1]["loss"])


class _FrozenDec:
    """The DEC model's weights at a target update, in NumPy: ``targets(rows)`` is P there."""

    def __init__(self, model: Any, unit: float, alpha: float, freq: np.ndarray) -> None:
        self.kernel = self.bias = None
        if model.encoder is not None:
            self.kernel, self.bias = (np.asarray(w) for w in model.encoder.get_weights())
        self.centroids = np.asarray(model.centroids)
        self.unit, self.alpha, self.freq = unit, alpha, np.asarray(freq, dtype=np.float64)

    def soft(self, rows: np.ndarray) -> np.ndarray:
        """Soft assignments float32 (n, k) of raw rows float (n, d), as the model gave them."""
        z = np.asarray(rows, dtype=np.float32) / self.unit
        if self.kernel is not None:
            z = z @ self.kernel + self.bias
        return student_t(z, self.centroids, self.alpha)

    def targets(self, rows: np.ndarray) -> np.ndarray:
        return target_distribution(self.soft(rows), self.freq)


def _row_stream(
    features: np.ndarray, batch: int, steps: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """``steps`` batches of rows float32 (B, d), in random order, continuing across epochs."""
    done = 0
    while done < steps:
        for rows in row_batches(features, batch, rng):
            yield rows
            done += 1
            if done == steps:
                return


def row_batches(
    features: np.ndarray, batch_size: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """One epoch of rows float32 (B, d) in a random order (incomplete last batch dropped)."""
    n = len(features)
    batch_size = min(batch_size, n)
    order = rng.permutation(n)
    for s in range(0, n - batch_size + 1, batch_size):
        yield np.asarray(features[np.sort(order[s : s + batch_size])], dtype=np.float32)
