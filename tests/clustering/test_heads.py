"""What the heads share: top-two assignments from probabilities, batched inference, the epoch
log, and seeded Keras."""

from __future__ import annotations

import numpy as np

from semclust.clustering.heads import EpochLog, predict_in_batches, prepare_keras, top_two

prepare_keras(0, 2)


def test_top_two():
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.4, 0.4, 0.2]])
    labels, dist = top_two(probs)
    assert labels.tolist() == [[1, 2], [0, 2], [0, 1]]  # a tie keeps the lower cluster first
    assert labels.dtype == np.int64 and dist.dtype == np.float32
    np.testing.assert_allclose(dist, [[0.3, 0.8], [0.5, 0.7], [0.6, 0.6]], rtol=1e-6)


def test_predict_in_batches_equals_one_call_and_logs_epochs():
    import keras

    prepare_keras(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    x = np.random.default_rng(0).normal(size=(1_000, 4)).astype(np.float32)
    whole = np.asarray(model(x, training=False))
    np.testing.assert_allclose(predict_in_batches(model, x, batch=128), whole, rtol=1e-5)
    epochs = EpochLog("test")
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    y = (x[:, 0] > 0).astype(np.int64)
    model.fit(x, y, epochs=3, batch_size=100, verbose=0, callbacks=[epochs.callback])
    assert len(epochs.epochs) == 3 and all(set(e) == {"loss"} for e in epochs.epochs)


def test_prepare_keras_seeds_the_initial_weights():
    import keras

    def weights() -> np.ndarray:
        prepare_keras(11)
        layer = keras.layers.Dense(5)
        layer.build((None, 3))
        return np.asarray(layer.kernel)

    np.testing.assert_array_equal(weights(), weights())
