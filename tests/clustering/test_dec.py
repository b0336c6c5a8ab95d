"""DEC: Student's t assignments, the target distribution, convergence and empty clusters."""

from __future__ import annotations

import numpy as np
import pytest

from semclust.clustering.dec import build_dec_model, student_t, target_distribution, train_dec
from semclust.clustering.heads import prepare_keras
from semclust.config import RefineConfig
from semclust.evaluate import cluster_accuracy
from tests.clustering.synthetic import planted

prepare_keras(0, 2)


def test_student_t_by_hand_and_as_the_keras_layer_computes_it():
    z = np.array([[0.0, 0.0], [3.0, 0.0]], dtype=np.float32)
    mu = np.array([[0.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    q = student_t(z, mu, alpha=1.0)
    # Row 0: squared distances 0 and 1 -> kernels 1 and 1/2; row 1: 9 and 4 -> 1/10 and 1/5.
    np.testing.assert_allclose(q, [[2 / 3, 1 / 3], [1 / 3, 2 / 3]], rtol=1e-6)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    centroids = rng.normal(size=(4, 8)).astype(np.float32)
    for alpha in (1.0, 3.0):
        model = build_dec_model(8, centroids, alpha, encoder=True)  # identity at first
        np.testing.assert_allclose(
            np.asarray(model(x)), student_t(x, centroids, alpha), rtol=1e-4, atol=1e-6
        )


def test_target_distribution_sharpens_and_divides_by_cluster_size():
    q = np.array([[0.6, 0.4], [0.5, 0.5]])
    freq = np.array([1.1, 0.9])
    p = target_distribution(q, freq)
    row0 = np.array([0.36 / 1.1, 0.16 / 0.9])
    row1 = np.array([0.25 / 1.1, 0.25 / 0.9])
    np.testing.assert_allclose(p, [row0 / row0.sum(), row1 / row1.sum()], rtol=1e-6)
    assert p[0, 0] > q[0, 0]  # the confident row gets more confident
    assert p[1, 1] > p[1, 0]  # a tie goes to the smaller cluster
    # An emptied cluster (size 0) does not divide by zero.
    assert np.isfinite(target_distribution(q, np.array([2.0, 0.0]))).all()


def test_dec_converges_from_poor_centroids_and_fixes_them():
    x, labels, centres = planted(1200, 4, 16, noise=0.6, seed=3)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    start = (centres + 2.0 * rng.normal(size=centres.shape) / np.sqrt(16)).astype(np.float32)
    before = cluster_accuracy(labels, student_t(x, start, 1.0).argmax(axis=1))
    assert before < 0.7
    # Larger steps than the default 0.01: 1,200 rows make only 9 steps an epoch.
    rc = RefineConfig(
        method="dec", batch_size=128, dec_max_epochs=30, dec_tolerance=0.001, dec_learning_rate=0.1
    )
    result = train_dec(x.astype(np.float32), start, rc)
    summary = result.summary
    assert summary["converged"] is True and 1 < summary["updates"] < 30
    curve = summary["loss_curve"]["dec"]
    assert len(curve) == summary["updates"] + 1
    assert curve[-1]["changed"] < 0.001 <= curve[1]["changed"]  # moved at first, then settled
    probs = result.predict(x)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
    assert cluster_accuracy(labels, probs.argmax(axis=1)) > 0.95


def test_dec_with_a_dead_centroid_runs_and_reports_the_empty_cluster():
    x, _, centres = planted(600, 3, 8, noise=0.3, seed=5)
    dead = -10 * np.ones((1, 8), dtype=np.float32)  # far from every row
    start = np.concatenate([centres, dead]).astype(np.float32)
    rc = RefineConfig(method="dec", batch_size=100, dec_max_epochs=5, dec_encoder=True)
    result = train_dec(x, start, rc)
    probs = result.predict(x)
    assert np.isfinite(probs).all()
    assert result.summary["empty_clusters"] >= 1
    assert (probs.argmax(axis=1) != 3).all()


def test_dec_needs_at_least_k_rows():
    x = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="at least k rows"):
        train_dec(x, np.eye(4, dtype=np.float32), RefineConfig(method="dec"))
