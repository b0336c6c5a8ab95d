"""SCAN on frozen embeddings (Van Gansbeke et al., 2020): a Keras clustering head.

Step 1, clustering: an MLP (one shared hidden layer, several softmax heads trained at once) is fed
pairs (row, one of its kNN-graph neighbours). Each head's loss is the neighbour-consistency term
``-mean log <p(row), p(neighbour)>`` minus ``entropy_weight`` times the entropy of the head's mean
prediction over the batch, which keeps clusters from collapsing into one. The head with the
lowest loss over the last epoch is kept.

Step 2, self-labelling: the kept head is trained further with cross-entropy on its own confident
predictions (max probability >= ``confidence_threshold``), class-balanced. The targets come from
the clean rows at the start of each epoch, the predictions being trained from augmented ones.

Embeddings are frozen, so the augmentation is feature dropout (``input_dropout``) and optional
Gaussian noise (``feature_noise``), applied inside the model in training mode only.

Batches stream through ``tf.data`` from a generator over the feature store (an array or a
``np.memmap``): nothing but the current batch is copied into memory.
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

_EPS = 1e-8
_TARGET_BATCH = 65_536  # rows predicted at once for the self-labelling targets


# --- batches -------------------------------------------------------------------------------------


def pair_batches(
    features: np.ndarray,
    neighbours: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
) -> Iterator[np.ndarray]:
    """One epoch of (row, neighbour) pairs, ``float32 (2B, d)``: B rows, then their B partners.

    Every row is an anchor once per epoch, in a random order; its partner is drawn uniformly
    from its row of ``neighbours`` int (n, m). The last incomplete batch is dropped (the entropy
    term needs a real batch); with fewer than ``batch_size`` rows one batch holds them all.
    """
    n = len(features)
    batch_size = min(batch_size, n)
    order = rng.permutation(n)
    for s in range(0, n - batch_size + 1, batch_size):
        rows = np.sort(order[s : s + batch_size])  # sorted: sequential reads of a memmap
        partner = neighbours[rows, rng.integers(0, neighbours.shape[1], len(rows))]
        yield np.concatenate([features[rows], features[partner]]).astype(np.float32, copy=False)


def generator_dataset(make_epoch: Callable[[], Iterator[np.ndarray]], dim: int) -> Any:
    """A ``tf.data.Dataset`` calling ``make_epoch`` again for each pass, batches prefetched.

    Repeated without end: Keras keeps one iterator across epochs when ``steps_per_epoch`` is
    given, so ``make_epoch`` must yield exactly ``steps_per_epoch`` batches per pass.
    """
    import tensorflow as tf

    return (
        tf.data.Dataset.from_generator(
            make_epoch, output_signature=tf.TensorSpec((None, dim), tf.float32)
        )
        .repeat()
        .prefetch(2)
    )


# --- the model -----------------------------------------------------------------------------------


def _trunk_layers(hidden: int, dropout: float, noise: float, seed: int) -> list[Any]:
    from keras import layers

    out: list[Any] = []
    if noise > 0:
        out.append(layers.GaussianNoise(noise, seed=seed))
    if dropout > 0:
        out.append(layers.Dropout(dropout, seed=seed + 1))
    if hidden > 0:
        out += [
            layers.Dense(hidden),
            layers.BatchNormalization(),
            layers.ReLU(),
        ]
    return out


def build_scan_model(input_dim: int, k: int, heads: int, rc: RefineConfig) -> Any:
    """A ``ScanModel``: rows float32 (n, d) -> probabilities float32 (n, heads, k)."""
    import keras
    from keras import layers, ops

    class ScanModel(keras.Model):
        """Shared trunk, ``heads`` softmax heads; ``compute_loss`` is the SCAN loss."""

        def __init__(self) -> None:
            super().__init__(name="scan")
            self.trunk = _trunk_layers(rc.hidden, rc.input_dropout, rc.feature_noise, rc.seed)
            self.heads = [layers.Dense(k, name=f"head{h}") for h in range(heads)]
            self.head_loss = [keras.metrics.Mean(name=f"head{h}_loss") for h in range(heads)]
            self.consistency = keras.metrics.Mean(name="consistency")
            self.entropy = keras.metrics.Mean(name="entropy")

        def call(self, x: Any, training: bool = False) -> Any:
            h = x
            for layer in self.trunk:
                h = layer(h, training=training)
            return ops.stack([ops.softmax(head(h), axis=-1) for head in self.heads], axis=1)

        def compute_loss(
            self,
            x: Any = None,
            y: Any = None,
            y_pred: Any = None,
            sample_weight: Any = None,
            training: bool = True,
        ) -> Any:
            per_head, consistency, entropy = scan_loss(y_pred, rc.entropy_weight)
            for h, tracker in enumerate(self.head_loss):
                tracker.update_state(per_head[h])
            self.consistency.update_state(ops.mean(consistency))
            self.entropy.update_state(ops.mean(entropy))
            return ops.sum(per_head)

    model = ScanModel()
    model(np.zeros((2, input_dim), dtype=np.float32))  # build the weights
    return model


def scan_loss(probs: Any, entropy_weight: float) -> tuple[Any, Any, Any]:
    """SCAN loss of a pair batch of probabilities (2B, H, k): B anchors, then B neighbours.

    Returns per-head (loss, consistency, entropy), each (H,): loss = consistency - weight x
    entropy, consistency = -mean log <p_anchor, p_neighbour>, entropy = H(mean p_anchor).
    """
    from keras import ops

    n = ops.shape(probs)[0] // 2
    anchors, partners = probs[:n], probs[n:]
    dot = ops.sum(anchors * partners, axis=-1)  # (B, H)
    consistency = -ops.mean(ops.log(ops.maximum(dot, _EPS)), axis=0)
    mean_p = ops.mean(anchors, axis=0)  # (H, k)
    entropy = -ops.sum(mean_p * ops.log(ops.maximum(mean_p, _EPS)), axis=-1)
    return consistency - entropy_weight * entropy, consistency, entropy


def build_self_label_model(scan_model: Any, head: int, input_dim: int) -> Any:
    """A model sharing ``scan_model``'s trunk and its head ``head``: rows -> (n, k) probs."""
    import keras
    from keras import ops

    class SelfLabelModel(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="scan_self_label")
            self.trunk = scan_model.trunk
            self.head = scan_model.heads[head]

        def call(self, x: Any, training: bool = False) -> Any:
            h = x
            for layer in self.trunk:
                h = layer(h, training=training)
            return ops.softmax(self.head(h), axis=-1)

    model = SelfLabelModel()
    model(np.zeros((2, input_dim), dtype=np.float32))
    return model


def confident_targets(
    probs: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Self-labelling targets from probabilities float (n, k).

    Returns (rows int64 (m,) whose max probability is >= ``threshold``, their clusters int64
    (m,), class weights float32 (k,)): each cluster's confident rows together weigh as much as
    any other's (weight m / (clusters present x rows of the cluster)), so that a large cluster
    cannot grow by outvoting the small ones.
    """
    return _weighted_targets(probs.max(axis=1), np.argmax(probs, axis=1), threshold, probs.shape[1])


def confident_targets_of(
    model: Any, features: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``confident_targets`` of ``model``'s predictions on float32 rows (n, d), chunk by chunk:
    only each row's top probability and cluster are kept (12 bytes a row, not 4 k)."""
    n = len(features)
    best = np.empty(n, dtype=np.float32)
    top = np.empty(n, dtype=np.int64)
    k = 0
    for s in range(0, n, _TARGET_BATCH):
        probs = predict_in_batches(model, features[s : s + _TARGET_BATCH])
        best[s : s + len(probs)] = probs.max(axis=1)
        top[s : s + len(probs)] = np.argmax(probs, axis=1)
        k = probs.shape[1]
    return _weighted_targets(best, top, threshold, k)


def _weighted_targets(
    best: np.ndarray, top: np.ndarray, threshold: float, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = np.flatnonzero(best >= threshold)
    labels = top[rows].astype(np.int64)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    present = max(1, int((counts > 0).sum()))
    weights = np.where(counts > 0, len(rows) / (present * np.maximum(counts, 1)), 0.0)
    return rows, labels, weights.astype(np.float32)


def labelled_batches(
    features: np.ndarray,
    rows: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One pass over ``rows`` in random order: (x float32 (B, d), y int64 (B,), w float32 (B,))."""
    order = rng.permutation(len(rows))
    for s in range(0, len(order) - batch_size + 1, batch_size):
        pick = np.sort(order[s : s + batch_size])
        y = labels[pick]
        yield np.asarray(features[rows[pick]], dtype=np.float32), y, weights[y]


# --- training ------------------------------------------------------------------------------------


def _optimizer(rc: RefineConfig) -> Any:
    import keras

    return keras.optimizers.AdamW(learning_rate=rc.learning_rate, weight_decay=rc.weight_decay)


def train_scan(
    features: np.ndarray,
    neighbours: np.ndarray,
    k: int,
    rc: RefineConfig,
    init_clusters: np.ndarray | None = None,
) -> HeadResult:
    """Train SCAN heads (then self-label the best) on rows float32 (n, d) and their graph
    neighbours int (n, m) (row indices into ``features``).

    Returns the kept head's predict function and a summary: the best head, each head's final
    loss, and the loss curves of both steps (one entry per epoch) for run.json.
    """
    import keras

    n, dim = features.shape
    if n < 2 * k:
        raise ValueError(f"SCAN needs at least 2 rows per cluster: {n} rows for k={k}")
    keras.utils.set_random_seed(rc.seed)
    rng = np.random.default_rng(rc.seed)
    batch = min(rc.batch_size, n)
    steps = n // batch
    model = build_scan_model(dim, k, rc.heads, rc)
    model.compile(optimizer=_optimizer(rc))
    if init_clusters is not None and rc.warm_start_epochs > 0:
        _warm_start(model, features, init_clusters, k, batch, rng, rc)
    pairs = generator_dataset(lambda: pair_batches(features, neighbours, batch, rng), dim)
    curve = EpochLog("scan")
    model.fit(
        pairs,
        epochs=rc.epochs,
        steps_per_epoch=steps,
        verbose=0,
        shuffle=False,
        callbacks=[curve.callback],
    )
    last = curve.epochs[-1]
    head_losses = [last[f"head{h}_loss"] for h in range(rc.heads)]
    best = int(np.argmin(head_losses))
    summary: dict[str, Any] = {
        "best_head": best,
        "head_losses": head_losses,
        "loss_curve": {"scan": curve.epochs},
        "steps_per_epoch": steps,
        "batch_size": batch,
        "neighbours_per_row": int(neighbours.shape[1]),
    }
    log.info("scan: head %d kept (final losses %s)", best, head_losses)

    def scan_head(x: np.ndarray) -> np.ndarray:
        return predict_in_batches(model, x)[:, best, :]

    predict = scan_head
    if rc.self_label_epochs > 0:
        predict, summary["loss_curve"]["self_label"] = _self_label(
            model, best, features, batch, rng, rc
        )

    def all_heads(x: np.ndarray) -> np.ndarray:
        return predict_in_batches(model, x)

    return HeadResult(predict=predict, summary=summary, predict_heads=all_heads)


def _self_label(
    scan_model: Any,
    head: int,
    features: np.ndarray,
    batch: int,
    rng: np.random.Generator,
    rc: RefineConfig,
) -> tuple[Callable[[np.ndarray], np.ndarray], list[dict[str, float]]]:
    """Self-labelling of the kept head; returns its predict function and one entry per epoch.

    The targets of an epoch are fixed at its start (the clean rows' confident predictions), so
    that a cluster cannot drift within an epoch by feeding on its own fresh predictions.
    """
    import keras
    import tensorflow as tf

    model = build_self_label_model(scan_model, head, features.shape[1])
    model.compile(optimizer=_optimizer(rc), loss=keras.losses.SparseCategoricalCrossentropy())
    n, dim = features.shape
    curve: list[dict[str, float]] = []
    for epoch in range(rc.self_label_epochs):
        rows, labels, weights = confident_targets_of(model, features, rc.confidence_threshold)
        entry = {"epoch": epoch + 1, "confident_fraction": round(len(rows) / n, 5)}
        if len(rows) < batch:
            log.warning(
                "self-labelling: only %d rows at confidence >= %s (a batch is %d); stopping",
                len(rows),
                rc.confidence_threshold,
                batch,
            )
            entry["stopped"] = "too few confident rows"
            curve.append(entry)
            break

        def make_epoch(r=rows, y=labels, w=weights) -> Iterator[tuple[Any, ...]]:
            return labelled_batches(features, r, y, w, batch, rng)

        dataset = (
            tf.data.Dataset.from_generator(
                make_epoch,
                output_signature=(
                    tf.TensorSpec((None, dim), tf.float32),
                    tf.TensorSpec((None,), tf.int64),
                    tf.TensorSpec((None,), tf.float32),
                ),
            )
            .repeat()
            .prefetch(2)
        )
        steps = len(rows) // batch
        history = model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
        entry["loss"] = round(float(history.history["loss"][-1]), 5)
        log.info("self-label epoch %d: %s", epoch + 1, entry)
        curve.append(entry)

    def self_labelled(x: np.ndarray) -> np.ndarray:
        return predict_in_batches(model, x)

    return self_labelled, curve


def _warm_start(
    model: Any,
    features: np.ndarray,
    clusters: np.ndarray,
    k: int,
    batch: int,
    rng: np.random.Generator,
    rc: RefineConfig,
) -> None:
    """Fit every head to the k-means clusters int (n,) for ``warm_start_epochs`` epochs.

    SCAN then starts from the k-means partition instead of a random one. Off by default: it
    helps where k-means is nearly right, but on Fashion-MNIST features SCAN could not undo
    k-means' merged and split classes from there (ACC 0.67 against 0.75 from a random start,
    5,000 images).
    """
    import keras
    import tensorflow as tf
    from keras import ops

    class AllHeads(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="scan_warm_start")
            self.inner = model

        def call(self, x: Any, training: bool = False) -> Any:
            return self.inner(x, training=training)

        def compute_loss(
            self,
            x: Any = None,
            y: Any = None,
            y_pred: Any = None,
            sample_weight: Any = None,
            training: bool = True,
        ) -> Any:
            target = ops.one_hot(ops.cast(y, "int32"), k)[:, None, :]
            ce = -ops.sum(target * ops.log(ops.maximum(y_pred, _EPS)), axis=-1)
            return ops.mean(ops.sum(ce, axis=1))

    known = np.flatnonzero((clusters >= 0) & (clusters < k))
    weights = np.ones(k, dtype=np.float32)
    warm = AllHeads()
    warm.compile(optimizer=_optimizer(rc))
    dim = features.shape[1]

    def make_epoch() -> Iterator[tuple[Any, ...]]:
        for x, y, _ in labelled_batches(features, known, clusters[known], weights, batch, rng):
            yield x, y

    dataset = tf.data.Dataset.from_generator(
        make_epoch,
        output_signature=(tf.TensorSpec((None, dim), tf.float32), tf.TensorSpec((None,), tf.int64)),
    )
    steps = len(known) // batch
    if steps:
        warm.fit(
            dataset.repeat(),
            epochs=rc.warm_start_epochs,
            steps_per_epoch=steps,
            verbose=0,
            shuffle=False,
        )
