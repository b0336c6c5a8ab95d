"""SCAN: the loss, the pair stream, and a head that beats k-means where k-means is weak."""

from __future__ import annotations

import numpy as np
import pytest

from semclust.clustering.heads import prepare_keras
from semclust.clustering.scan import confident_targets, pair_batches, scan_loss, train_scan
from semclust.config import RefineConfig
from semclust.evaluate import cluster_accuracy
from tests.label.runs import exact_knn

prepare_keras(0, 2)


def test_scan_loss_on_hand_made_probabilities():
    k = 4
    uniform = np.full((6, 1, k), 1 / k, dtype=np.float32)  # 3 anchors, 3 neighbours, 1 head
    loss, consistency, entropy = (np.asarray(v) for v in scan_loss(uniform, 5.0))
    # <p, q> = 1/k for uniform rows; the mean prediction is uniform: entropy log k.
    assert consistency[0] == pytest.approx(np.log(k), rel=1e-5)
    assert entropy[0] == pytest.approx(np.log(k), rel=1e-5)
    assert loss[0] == pytest.approx(np.log(k) - 5 * np.log(k), rel=1e-5)
    # Confident, agreeing pairs all in one cluster: no consistency cost, no entropy.
    onehot = np.zeros((6, 1, k), dtype=np.float32)
    onehot[:, 0, 2] = 1
    _, consistency, entropy = (np.asarray(v) for v in scan_loss(onehot, 5.0))
    assert consistency[0] == pytest.approx(0, abs=1e-5) and entropy[0] == pytest.approx(0, abs=1e-5)
    # Disagreeing confident pairs cost -log(eps): far more than any agreeing pair.
    swapped = onehot.copy()
    swapped[3:, 0] = np.roll(swapped[3:, 0], 1, axis=1)
    assert np.asarray(scan_loss(swapped, 5.0)[1])[0] > 10


def test_pair_batches_cover_every_row_with_a_neighbour():
    n, d = 103, 4
    features = np.arange(n * d, dtype=np.float32).reshape(n, d)
    neighbours = (np.arange(n)[:, None] + np.array([[1, 2, 3]])) % n
    batches = list(pair_batches(features, neighbours, 25, np.random.default_rng(0)))
    assert len(batches) == 4  # 103 // 25, the incomplete batch dropped
    anchors = np.concatenate([b[:25] for b in batches])
    partners = np.concatenate([b[25:] for b in batches])
    rows = (anchors[:, 0] / d).astype(int)
    partner_rows = (partners[:, 0] / d).astype(int)
    assert len(set(rows.tolist())) == 100  # no row twice within an epoch
    assert all(p in neighbours[r] for r, p in zip(rows, partner_rows, strict=True))
    # Fewer rows than a batch: one batch with all of them.
    assert [
        len(b)
        for b in pair_batches(features[:10], neighbours[:10] % 10, 25, np.random.default_rng(0))
    ] == [20]


def test_confident_targets_balance_classes():
    probs = np.array([[0.995, 0.005], [0.999, 0.001], [0.998, 0.002], [0.001, 0.999], [0.6, 0.4]])
    rows, labels, weights = confident_targets(probs, 0.99)
    assert rows.tolist() == [0, 1, 2, 3] and labels.tolist() == [0, 0, 0, 1]
    # Both clusters weigh the same in total: 3 x w0 == 1 x w1.
    assert 3 * weights[0] == pytest.approx(weights[1])


def test_confident_targets_of_a_model_chunk_by_chunk_equal_those_of_all_probabilities(
    monkeypatch,
):
    """The self-labelling targets come from a chunked pass that keeps only each row's top
    probability (a 10M x 1000 probability matrix would be 40 GB): the same rows, labels and
    weights as from every probability at once, across chunk boundaries."""
    import keras

    from semclust.clustering import scan

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(5, activation="softmax")])
    x = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32) * 3
    whole = scan.confident_targets(np.asarray(model(x)), 0.6)
    monkeypatch.setattr(scan, "_TARGET_BATCH", 96)  # 11 chunks, the last one short
    chunked = scan.confident_targets_of(model, x, 0.6)
    assert 100 < len(whole[0]) < 1000  # the threshold splits the rows
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def digits_with_noisy_graph():
    """scikit-learn's digits (1,797 real 8x8 images, 10 classes), centred and normalised,
    with an exact 10-NN graph of which a planted fifth of the neighbours are random rows."""
    from sklearn.datasets import load_digits

    x, labels = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    x -= x.mean(axis=0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows, _ = exact_knn(x, 10)
    rng = np.random.default_rng(1)
    noisy = rng.random(rows.shape) < 0.2
    rows = np.where(noisy, rng.integers(0, len(x), rows.shape), rows)
    return x, labels, rows


def test_scan_beats_kmeans_on_digits_with_noisy_neighbours(digits_with_noisy_graph):
    from sklearn.metrics import normalized_mutual_info_score

    from semclust.clustering.kmeans import assign, faiss_kmeans

    x, labels, neighbours = digits_with_noisy_graph
    assert (labels[neighbours] == labels[:, None]).mean() < 0.8  # the graph really is noisy
    centroids = faiss_kmeans(x, 10, niter=20, nredo=5, spherical=True, init="kmeans++", seed=0)
    kmeans = assign(x, centroids, True)[0][:, 0]
    rc = RefineConfig(
        epochs=30,
        batch_size=128,
        learning_rate=3e-3,
        hidden=128,
        heads=3,
        num_neighbors=10,
        self_label_epochs=2,
        confidence_threshold=0.9,
        seed=0,
    )
    result = train_scan(x, neighbours, 10, rc)
    probs = result.predict(x)
    assert probs.shape == (len(x), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
    pred = probs.argmax(axis=1)
    nmi_kmeans = normalized_mutual_info_score(labels, kmeans)
    nmi_scan = normalized_mutual_info_score(labels, pred)
    # k-means about 0.73; SCAN about 0.82 (0.82-0.83 over training seeds 0-2).
    assert nmi_scan > nmi_kmeans + 0.05, (nmi_scan, nmi_kmeans)
    assert cluster_accuracy(labels, pred) > cluster_accuracy(labels, kmeans)
    summary = result.summary
    assert summary["best_head"] == int(np.argmin(summary["head_losses"]))
    curve = summary["loss_curve"]["scan"]
    assert len(curve) == 30 and curve[-1]["loss"] < curve[0]["loss"]
    assert [e["epoch"] for e in summary["loss_curve"]["self_label"]] == [1, 2]
    # Every head is scored, before self-labelling.
    assert result.predict_heads(x[:5]).shape == (5, 3, 10)


def test_scan_is_reproducible_with_a_seed(digits_with_noisy_graph):
    x, _, neighbours = digits_with_noisy_graph
    x, neighbours = x[:600], neighbours[:600] % 600
    rc = RefineConfig(
        epochs=2, batch_size=128, hidden=16, heads=2, num_neighbors=10, self_label_epochs=0, seed=7
    )
    a = train_scan(x, neighbours, 10, rc).predict(x)
    b = train_scan(x, neighbours, 10, rc).predict(x)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_config_is_validated():
    with pytest.raises(
        ValueError, match=r"refine.method='kmeans' is not allowed; choose one of scan, dec"
    ):
        RefineConfig(method="kmeans")
    with pytest.raises(ValueError, match="confidence_threshold"):
        RefineConfig(confidence_threshold=1.0)
    with pytest.raises(ValueError, match=r"refine.k must be >= 2"):
        RefineConfig(k=1)
