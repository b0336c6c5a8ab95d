"""Seed-label mode on real data (scikit-learn's digits): honest held-out accuracy."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semclust import storage
from semclust.config import LabelConfig
from tests.label.runs import make_run, run_label, uris_of


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """Digits as embeddings (centred, 64-d), k-means k=10 and a 10-NN graph."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32) - x.mean(axis=0)
    run = tmp_path_factory.mktemp("digits") / "run"
    ids = make_run(run, x.astype(np.float32), 10, rows_per_part=700, knn_k=10)
    return run, ids, y


def _seed_file(path, ids, names, rows) -> str:
    uris = np.array(uris_of(ids), dtype=object)
    table = pa.table({"uri": uris[rows].tolist(), "label": [str(v) for v in names[rows]]})
    if str(path).endswith(".csv"):
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, str(path))
    else:
        storage.write_parquet(str(path), table)
    return str(path)


def _read(run) -> dict[str, np.ndarray]:
    table = pq.read_table(run / "labels")
    return {name: np.asarray(table[name].to_pylist()) for name in table.column_names}


def test_cross_validated_accuracy_predicts_the_accuracy_on_the_rest(digits_run, tmp_path):
    run, ids, y = digits_run
    rng = np.random.default_rng(0)
    seeds = np.sort(rng.choice(len(ids), size=180, replace=False))  # 10% of the images
    names = np.array([f"digit{v}" for v in y], dtype=object)
    path = _seed_file(tmp_path / "seeds.csv", ids, names, seeds)
    record = run_label(str(run), LabelConfig(seed_labels=path, head_epochs=60, cv_folds=5))

    cv = record["cross_validation"]
    assert set(cv["accuracy"]) == {"head", "propagation", "blend"}
    assert min(cv["accuracy"].values()) > 0.8  # each way works on digits, the head included
    assert record["method"] == max(cv["accuracy"], key=cv["accuracy"].get)
    labels = _read(run)
    row_of = {i: r for r, i in enumerate(ids.tolist())}
    rows = np.array([row_of[i] for i in labels["image_id"]])
    is_seed = np.isin(rows, seeds)
    assert (labels["source"][is_seed] == "seed").all() and (
        labels["confidence"][is_seed] == 1
    ).all()
    assert (labels["label"][is_seed] == names[rows[is_seed]]).all()
    assert set(labels["source"][~is_seed]) == {record["method"]}
    true_accuracy = np.mean(labels["label"][~is_seed] == names[rows[~is_seed]])
    claimed = cv["accuracy"][record["method"]]
    assert true_accuracy > 0.85
    assert abs(claimed - true_accuracy) < 0.06, (claimed, true_accuracy)
    # Confidence means something: confident labels are right more often.
    conf = labels["confidence"][~is_seed]
    right = labels["label"][~is_seed] == names[rows[~is_seed]]
    assert right[conf >= np.median(conf)].mean() > right[conf < np.median(conf)].mean()
    info = json.loads((run / "run.json").read_text())["stages"]["label"]
    assert info["seeds"] == {"listed": 180, "in_run": 180, "classes": 10}
    assert sum(c["count"] for c in info["classes"].values()) == len(ids)


def test_random_seed_labels_score_at_chance(digits_run, tmp_path):
    run, ids, _ = digits_run
    rng = np.random.default_rng(1)
    seeds = np.sort(rng.choice(len(ids), size=200, replace=False))
    noise = np.array([f"c{v}" for v in rng.integers(0, 4, len(ids))], dtype=object)
    path = _seed_file(tmp_path / "noise.parquet", ids, noise, seeds)
    record = run_label(str(run), LabelConfig(seed_labels=path, head_epochs=30, cv_folds=4))
    # Four balanced random classes: no method can honestly do much better than 1/4.
    assert max(record["cross_validation"]["accuracy"].values()) < 0.4


def test_seed_label_errors(digits_run, tmp_path):
    run, ids, y = digits_run
    names = np.array([str(v) for v in y], dtype=object)
    other = tmp_path / "other.csv"
    other.write_text("uri,label\nfile:///nowhere/a.jpg,cat\nfile:///nowhere/b.jpg,dog\n")
    with pytest.raises(ValueError, match="none of the 2 images"):
        run_label(str(run), LabelConfig(seed_labels=str(other)))
    lonely = _seed_file(tmp_path / "lonely.csv", ids, names, np.array([0, 1, 2, 3, 10, 11, 12]))
    with pytest.raises(ValueError, match="at least 2 labelled images"):
        run_label(str(run), LabelConfig(seed_labels=lonely))
    with pytest.raises(ValueError, match="not both"):
        LabelConfig(seed_labels=lonely, refs=str(tmp_path))
    with pytest.raises(ValueError, match=r"label.method=.vote. is not allowed"):
        LabelConfig(seed_labels=lonely, method="vote")
