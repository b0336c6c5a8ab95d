"""Labelling from a small labelled subset (``uri,label``): a classifier head, label propagation.

1. The seed images' embeddings are looked up in the run (matched on ``uri``).
2. Stratified k-fold cross-validation on the seeds estimates, honestly (each fold's seeds are
   unseen by its model), the accuracy of three ways to label the rest:

   - ``head``: a Keras softmax classifier on the embeddings (standardised on the training
     seeds, feature dropout, weight decay);
   - ``propagation``: label propagation over the kNN graph (Zhou et al., 2004): with W the
     symmetrised graph of affinities max(cos, 0)^3 and S = D^-1/2 W D^-1/2, iterate
     F <- alpha S F + Y from the seeds' one-hot labels Y; a row's label is argmax F;
   - ``blend``: the mean of both distributions.

3. ``method=auto`` keeps the one with the best cross-validated accuracy; it is then fitted on
   every seed and labels every row. Seeds keep their given label (confidence 1, source
   ``seed``); other rows get the predicted label with its probability as the confidence
   (source ``head``, ``propagation`` or ``blend``), ``unknown`` under ``min_confidence``.

Propagation holds a float32 (n, classes) matrix and the graph (about 12 bytes an edge) in
memory; past ``max_propagation_memory`` it is skipped with a warning and the head is used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from semclust.config import parse_bytes
from semclust.errors import UserError
from semclust.label.common import (
    UNKNOWN,
    LabelWriter,
    edge_weights,
    read_graph,
    read_uri_labels,
    uri_key,
)
from semclust.rundir.embeddings import RunRows

if TYPE_CHECKING:
    from semclust.config import LabelConfig

log = logging.getLogger(__name__)


# --- the classifier head -------------------------------------------------------------------------


class HeadTrainer:
    """A Keras softmax classifier on embeddings, built and compiled once, refitted per fold.

    ``fit(x float32 (m, D), y int (m,))`` starts again from the same initial weights (and a
    fresh optimizer state) each time and returns ``predict(rows (n, D)) -> float32 (n, C)``,
    valid until the next ``fit`` (one model is reused, so its training step is traced once).
    Rows are standardised with the training rows' mean and deviation; classes are weighted by
    inverse frequency, so a rare class in the seeds is not ignored.
    """

    def __init__(self, dim: int, classes: int, lc: LabelConfig) -> None:
        import keras

        keras.utils.set_random_seed(lc.seed)
        self.classes = classes
        self.lc = lc
        layers: list = [keras.Input((dim,)), keras.layers.Dropout(lc.head_dropout, seed=lc.seed)]
        if lc.head_hidden:
            layers.append(keras.layers.Dense(lc.head_hidden, activation="relu"))
        layers.append(keras.layers.Dense(classes, activation="softmax"))
        self.model = keras.Sequential(layers)
        self.model.compile(
            optimizer=keras.optimizers.AdamW(learning_rate=1e-2, weight_decay=lc.head_weight_decay),
            loss=keras.losses.SparseCategoricalCrossentropy(),
        )
        self.model.optimizer.build(self.model.trainable_variables)
        self.initial = self.model.get_weights()
        # Slots, step counter and learning rate as built: restored before every fit.
        self.initial_optimizer = [np.array(v) for v in self.model.optimizer.variables]

    def fit(self, x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        from semclust.clustering.heads import predict_in_batches

        self.model.set_weights(self.initial)
        for variable, value in zip(
            self.model.optimizer.variables, self.initial_optimizer, strict=True
        ):
            variable.assign(value)
        mean = x.mean(axis=0)
        std = x.std(axis=0) + 1e-6
        counts = np.bincount(y, minlength=self.classes).astype(np.float64)
        weights = (len(y) / (self.classes * np.maximum(counts, 1)))[y].astype(np.float32)
        import tensorflow as tf

        batch = int(min(256, len(y)))
        # All epochs in one fit call: Keras' per-epoch overhead dwarfs a step this small.
        data = (
            tf.data.Dataset.from_tensor_slices((((x - mean) / std).astype(np.float32), y, weights))
            .shuffle(len(y), seed=self.lc.seed, reshuffle_each_iteration=True)
            .batch(batch)
            .repeat(self.lc.head_epochs)
        )
        self.model.fit(data, epochs=1, verbose=0, shuffle=False)
        model = self.model

        def predict(rows: np.ndarray) -> np.ndarray:
            return predict_in_batches(model, ((rows - mean) / std).astype(np.float32))

        return predict


# --- label propagation ---------------------------------------------------------------------------


def propagation_operator(graph: Any, metric: str) -> Any:
    """S = D^-1/2 W D^-1/2 (sparse float32 (n, n)) of the symmetrised kNN affinities W."""
    import scipy.sparse as sp

    w = edge_weights(graph, metric)
    w = (w + w.T).tocsr()
    degree = np.asarray(w.sum(axis=1)).ravel()
    inv = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1e-12)), 0.0)
    d = sp.diags(inv.astype(np.float32))
    return (d @ w @ d).astype(np.float32).tocsr()


def propagate(
    operator: Any,
    seed_rows: np.ndarray,
    seed_classes: np.ndarray,
    classes: int,
    alpha: float,
    iterations: int,
) -> np.ndarray:
    """Label propagation: F float32 (n, classes) after ``iterations`` of F <- a S F + Y.

    Rows normalised to sum 1 where they received anything; rows the seeds never reach are 0.
    """
    n = operator.shape[0]
    y = np.zeros((n, classes), dtype=np.float32)
    y[seed_rows, seed_classes] = 1.0
    f = y.copy()
    for _ in range(iterations):
        f = alpha * (operator @ f) + y
    total = f.sum(axis=1, keepdims=True)
    return np.where(total > 0, f / np.maximum(total, 1e-12), 0.0).astype(np.float32)


# --- cross-validation ----------------------------------------------------------------------------


def _folds(y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    smallest = int(np.bincount(y).min())
    folds = min(folds, smallest)
    if folds < 2:
        raise UserError(
            "seed labels: every class needs at least 2 labelled images for cross-validation "
            f"(the smallest has {smallest})"
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y))


def cross_validate(
    x: np.ndarray,
    y: np.ndarray,
    seed_rows: np.ndarray,
    classes: int,
    operator: Any | None,
    lc: LabelConfig,
) -> dict[str, Any]:
    """Held-out accuracy of head, propagation and blend by stratified k-fold on the seeds.

    ``x`` float32 (m, D) and ``y`` int (m,) are the seeds' embeddings and classes, ``seed_rows``
    int (m,) their rows in the run (for propagation over ``operator``; None skips it).
    """
    splits = _folds(y, lc.cv_folds, lc.seed)
    correct = {"head": 0, "propagation": 0, "blend": 0}
    per_fold = []
    trainer = HeadTrainer(x.shape[1], classes, lc)
    for train, test in splits:
        head = trainer.fit(x[train], y[train])(x[test])
        fold = {"head": float(np.mean(head.argmax(1) == y[test]))}
        correct["head"] += int((head.argmax(1) == y[test]).sum())
        if operator is not None:
            f = propagate(
                operator,
                seed_rows[train],
                y[train],
                classes,
                lc.propagation_alpha,
                lc.propagation_iterations,
            )
            prop = f[seed_rows[test]]
            reached = prop.sum(axis=1) > 0
            prop = np.where(reached[:, None], prop, head)  # unreached rows: the head decides
            blend = (head + prop) / 2
            for name, p in (("propagation", prop), ("blend", blend)):
                hits = p.argmax(1) == y[test]
                correct[name] += int(hits.sum())
                fold[name] = float(np.mean(hits))
        per_fold.append({k: round(v, 5) for k, v in fold.items()})
    methods = ["head"] + (["propagation", "blend"] if operator is not None else [])
    return {
        "folds": len(splits),
        "seeds": len(y),
        "accuracy": {m: round(correct[m] / len(y), 5) for m in methods},
        "per_fold": per_fold,
    }


# --- the mode ------------------------------------------------------------------------------------


def label_with_seeds(run_dir: str, lc: LabelConfig, rows: RunRows) -> dict[str, Any]:
    """Write labels/ from seed labels; returns the run.json record (CV accuracy, classes)."""
    listed, seed_rows, names, y = _seeds_in_run(lc, rows)
    classes = len(names)
    x = rows.gather(seed_rows)
    operator, skipped = _propagation_operator(run_dir, rows, classes, lc)
    cv = cross_validate(x, y, seed_rows, classes, operator, lc)
    method = lc.method
    if method in ("propagation", "blend") and operator is None:
        raise UserError(
            f"label.method={method} needs label propagation, which was skipped: {skipped}"
        )
    if method == "auto":
        method = max(cv["accuracy"], key=lambda m: (cv["accuracy"][m], m == "head"))
    log.info("seed labels: cross-validated accuracy %s; labelling with %s", cv["accuracy"], method)
    head = HeadTrainer(x.shape[1], classes, lc).fit(x, y)
    prop = None
    if method != "head":
        prop = propagate(
            operator, seed_rows, y, classes, lc.propagation_alpha, lc.propagation_iterations
        )
    writer = _write_labels(run_dir, rows, lc, method, head, prop, seed_rows, y, names)
    return {
        "mode": "seed_labels",
        "seed_labels": lc.seed_labels,
        "seeds": {"listed": listed, "in_run": len(seed_rows), "classes": classes},
        "cross_validation": cv,
        "method": method,
        "propagation": None
        if skipped
        else {"alpha": lc.propagation_alpha, "iterations": lc.propagation_iterations},
        "propagation_skipped": skipped,
        "rows": len(rows),
        "labels_written": writer.written,
        "classes": writer.summary(),
    }


def _seeds_in_run(lc: LabelConfig, rows: RunRows) -> tuple[int, np.ndarray, list[str], np.ndarray]:
    """(seed images listed, their rows int64 (m,) in the run, class names, class int (m,)) of
    the seed labels file; an image listed twice counts once."""
    assert lc.seed_labels is not None
    uris, labels = read_uri_labels(lc.seed_labels)
    if not uris:
        raise UserError(f"seed labels file {lc.seed_labels!r} has no labelled rows")
    found = rows.rows_of(np.array([uri_key(u) for u in uris], dtype=np.int64))
    keep = found >= 0
    if not keep.any():
        raise UserError(
            f"none of the {len(uris)} images in {lc.seed_labels!r} is in the run (matched on uri; "
            "write them exactly as embedded, e.g. s3://bucket/key or an absolute path)"
        )
    if (~keep).any():
        log.warning(
            "seed labels: %d of %d images are not in the run; ignored",
            int((~keep).sum()),
            len(uris),
        )
    seed_rows, first = np.unique(found[keep], return_index=True)
    seed_names = np.asarray(labels, dtype=object)[keep][first]
    unique, y = np.unique(seed_names.astype(str), return_inverse=True)
    names = [str(v) for v in unique]
    if UNKNOWN in names:
        raise UserError(f"a seed label may not be {UNKNOWN!r}")
    if len(names) < 2:
        raise UserError("seed labels need at least 2 classes")
    return len(uris), seed_rows, names, y


def _propagation_operator(
    run_dir: str, rows: RunRows, classes: int, lc: LabelConfig
) -> tuple[Any | None, str | None]:
    """(propagation operator, None), or (None, why propagation is skipped)."""
    need = len(rows) * classes * 4 * 3  # F, Y and a product, float32
    if need > parse_bytes(lc.max_propagation_memory):
        skipped = f"needs about {need / 2**30:.1f} GiB > label.max_propagation_memory"
    else:
        graph = read_graph(run_dir, rows)
        if graph is not None:
            return propagation_operator(*graph), None
        skipped = "the run has no kNN graph"
    log.warning("seed labels: label propagation skipped (%s); the head labels every image", skipped)
    return None, skipped


PREDICT_ROWS = 8192


def _write_labels(
    run_dir: str,
    rows: RunRows,
    lc: LabelConfig,
    method: str,
    head: Callable[[np.ndarray], np.ndarray],
    prop: np.ndarray | None,
    seed_rows: np.ndarray,
    y: np.ndarray,
    names: list[str],
) -> LabelWriter:
    """labels/, shard by shard: the predicted label of every row (the head's, propagation's
    or their blend), the seeds' own labels for the seeds."""
    n = len(rows)
    is_seed = np.zeros(n, dtype=bool)
    is_seed[seed_rows] = True
    seed_class = np.full(n, -1, dtype=np.int64)
    seed_class[seed_rows] = y
    label_names = np.asarray([*names, UNKNOWN], dtype=object)
    writer = LabelWriter(run_dir)
    for uri, span, vectors in rows.embeddings():
        winner = np.empty(len(vectors), dtype=np.int64)
        conf = np.empty(len(vectors), dtype=np.float32)
        # A few thousand rows at a time: a shard's (rows, classes) probabilities would be 2 GB
        # at 10,000 classes.
        for s in range(0, len(vectors), PREDICT_ROWS):
            part = slice(s, s + PREDICT_ROWS)
            probs = head(vectors[part])
            if prop is not None:
                p = prop[span][part]
                reached = p.sum(axis=1) > 0
                p = np.where(reached[:, None], p, probs)
                probs = p if method == "propagation" else (probs + p) / 2
            winner[part] = probs.argmax(axis=1)
            conf[part] = probs[np.arange(len(probs)), winner[part]]
        lab = label_names[winner]
        lab[conf < lc.min_confidence] = UNKNOWN
        source = np.full(len(winner), method, dtype=object)
        seeds_here = is_seed[span]
        lab[seeds_here] = label_names[seed_class[span][seeds_here]]
        conf[seeds_here] = 1.0
        source[seeds_here] = "seed"
        writer.write(uri, rows.ids[span], lab, conf, source)
    return writer
