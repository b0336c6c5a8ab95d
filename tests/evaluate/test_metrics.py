"""Metrics: hand-computed values on toy labellings, and metrics.json of a small run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from semclust import storage
from semclust.evaluate import (
    cluster_accuracy,
    clustering_scores,
    cosine_silhouette,
    evaluate_run,
    hungarian_match,
    per_class_scores,
    purity,
    seed_stability,
    size_balance,
)
from tests.label.runs import elongated_clusters, make_run, uris_of

# 8 images, 3 classes, 3 clusters; cluster 1 holds one "a" and all three "b".
TRUTH = ["a", "a", "a", "b", "b", "b", "c", "c"]
PRED = [0, 0, 1, 1, 1, 1, 2, 2]


def test_toy_scores_match_hand_computed_values():
    scores = clustering_scores(TRUTH, PRED)
    # Matching 0->a, 1->b, 2->c puts 2 + 3 + 2 of 8 rows on the diagonal.
    assert scores["acc"] == pytest.approx(7 / 8)
    assert scores["purity"] == pytest.approx(7 / 8)
    # ARI: pairs within cells 1+0+3+1 = 5, within clusters 1+6+1 = 8, within classes 3+3+1 = 7
    # of C(8,2) = 28 pairs; expected 8*7/28 = 2, max (8+7)/2.
    assert scores["ari"] == pytest.approx((5 - 2) / (7.5 - 2))
    # NMI (arithmetic mean of the entropies), from the 4 non-empty cells.
    cells = [(2, 2, 3), (1, 4, 3), (3, 4, 3), (2, 2, 2)]  # (count, cluster size, class size)
    mi = sum(c / 8 * math.log((c / 8) / ((r / 8) * (t / 8))) for c, r, t in cells)
    h_pred = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    h_true = -(2 * 0.375 * math.log(0.375) + 0.25 * math.log(0.25))
    assert scores["nmi"] == pytest.approx(mi / ((h_pred + h_true) / 2))
    assert scores["nmi"] == pytest.approx(0.755004, abs=1e-6)
    assert scores["n"] == 8


def test_per_class_precision_and_recall_of_the_matched_clusters():
    assert hungarian_match(TRUTH, PRED) == {0: "a", 1: "b", 2: "c"}
    per_class = per_class_scores(TRUTH, PRED)
    assert per_class["a"] == {
        "precision": 1.0,
        "recall": pytest.approx(2 / 3, abs=1e-5),
        "support": 3,
        "cluster": 0,
    }
    assert per_class["b"]["precision"] == pytest.approx(0.75)
    assert per_class["b"]["recall"] == 1.0
    assert per_class["c"] == {"precision": 1.0, "recall": 1.0, "support": 2, "cluster": 2}


def test_a_permuted_labelling_is_perfect():
    truth = ["cat", "cat", "dog", "dog", "owl", "owl", "owl"]
    pred = [7, 7, 3, 3, 5, 5, 5]
    scores = clustering_scores(truth, pred)
    assert scores["acc"] == scores["purity"] == 1.0
    assert scores["nmi"] == pytest.approx(1.0)
    assert scores["ari"] == pytest.approx(1.0)


def test_more_clusters_than_classes_leaves_the_extra_cluster_unmatched():
    truth = ["a", "a", "a", "b", "b", "b"]
    pred = [0, 0, 2, 1, 1, 1]
    # Cluster 2 matches no class: its row counts as wrong for ACC but not for purity.
    assert cluster_accuracy(truth, pred) == pytest.approx(5 / 6)
    assert purity(truth, pred) == 1.0
    assert per_class_scores(truth, pred)["a"]["recall"] == pytest.approx(2 / 3, abs=1e-5)


def test_size_balance():
    assert size_balance(np.array([10, 10, 10]))["normalized_entropy"] == pytest.approx(1.0)
    skewed = size_balance(np.array([28, 1, 1]))
    assert skewed["normalized_entropy"] < 0.4
    assert skewed["max_over_min"] == 28.0
    empty = size_balance(np.array([5, 0, 5]))
    assert empty["empty"] == 1 and empty["max_over_min"] is None


def test_silhouette_and_stability_separate_structure_from_noise():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3
    labels = np.repeat(np.arange(4), 100)
    x = (centres[labels] + rng.normal(size=(400, 16))).astype(np.float32)
    assert cosine_silhouette(x, labels) > 0.5
    assert abs(cosine_silhouette(x, rng.permutation(labels))) < 0.05
    assert cosine_silhouette(x, np.zeros(400)) is None  # one cluster: undefined
    clear = seed_stability(x, 4, True, 20, seeds=[1, 2, 3])
    assert clear["mean_pairwise_ari"] > 0.95
    blob = rng.normal(size=(400, 16)).astype(np.float32)
    unclear = seed_stability(blob, 4, True, 20, seeds=[1, 2, 3])
    assert unclear["mean_pairwise_ari"] < clear["mean_pairwise_ari"] - 0.2
    # Planted clusters keep nearly every row's neighbours with it; cuts through one blob do not.
    assert clear["knn_k"] == 10 and clear["min_knn_agreement"] > 0.95
    assert unclear["mean_knn_agreement"] < clear["mean_knn_agreement"] - 0.1
    assert clear["min_knn_agreement"] <= clear["mean_knn_agreement"]


def test_knn_agreement_counts_neighbours_in_the_same_cluster():
    # Two tight pairs far apart, k-means k=2: every row's nearest other row is its pair.
    x = np.array([[1, 0], [1, 0.01], [-1, 0], [-1, 0.01]], np.float32)
    from semclust.evaluate.scores import _sample_neighbours

    assert _sample_neighbours(x, True, 1).ravel().tolist() == [1, 0, 3, 2]
    # Exact duplicates: each row still finds the other, never itself.
    twins = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
    found = _sample_neighbours(twins, True, 1).ravel().tolist()
    assert found == [1, 0, 3, 2]
    three = _sample_neighbours(x, True, 3)
    assert (three != np.arange(4)[:, None]).all() and three.shape == (4, 3)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    run = tmp_path_factory.mktemp("eval") / "run"
    x, labels = elongated_clusters(600, 4, 16, 1.5, 0.1, seed=3)
    ids = make_run(run, x, 4, rows_per_part=250, knn_k=5)
    return run, ids, labels


def _truth_file(path: Path, ids: np.ndarray, labels: np.ndarray, keep: np.ndarray) -> str:
    uris = np.array(uris_of(ids), dtype=object)
    table = pa.table({"uri": uris[keep].tolist(), "label": [f"class{v}" for v in labels[keep]]})
    storage.write_parquet(str(path), table)
    return str(path)


def test_evaluate_run_writes_every_score(small_run, tmp_path):
    run, ids, labels = small_run
    keep = np.arange(len(ids)) % 10 != 0  # a tenth of the images has no truth
    truth = _truth_file(tmp_path / "truth.parquet", ids, labels, keep)
    # A refined clustering that is exactly the truth, and labels/ with known right/wrong rows.
    from semclust.rundir.tables import assignments_table

    perfect = np.stack([labels, (labels + 1) % 4], axis=1)
    dist = np.zeros((len(ids), 2), dtype=np.float32)
    for part, s in enumerate(range(0, len(ids), 250)):
        span = slice(s, s + 250)
        storage.write_parquet(
            str(run / "assignments_scan" / f"part-{part:05d}.parquet"),
            assignments_table(ids[span], perfect[span], dist[span]),
        )
    names = np.array([f"class{v}" for v in labels], dtype=object)
    names[:60] = "unknown"  # not covered
    names[60:90] = "class9"  # wrong (a class the truth does not have)
    source = np.array(["refs"] * len(ids), dtype=object)
    source[90:100] = "seed"
    storage.write_parquet(
        str(run / "labels" / "part-00000.parquet"),
        pa.table(
            {
                "image_id": pa.array(ids, pa.int64()),
                "label": names.tolist(),
                "confidence": pa.array(np.ones(len(ids)), pa.float32()),
                "source": source.tolist(),
            }
        ),
    )

    metrics = evaluate_run(str(run), truth, silhouette_sample=300, stability_sample=300)
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["kmeans"]["nmi"] == pytest.approx(metrics["kmeans"]["nmi"])
    assert metrics["rows"] == {"embedded": 600, "without_truth": 60}
    assert metrics["kmeans"]["n"] == metrics["scan"]["n"] == 540
    assert metrics["scan"]["acc"] == metrics["scan"]["nmi"] == 1.0
    # k-means: the same scores as computed directly from its shards (in shard order).
    kmeans = pa.concat_tables(
        storage.read_parquet(u) for u in storage.list_shards(str(run / "assignments"))
    )
    assert kmeans["image_id"].to_numpy().tolist() == ids.tolist()
    expected = clustering_scores(
        [f"class{v}" for v in labels[keep]], kmeans["cluster"].to_numpy()[keep].tolist()
    )
    assert metrics["kmeans"]["acc"] == pytest.approx(expected["acc"])
    assert metrics["kmeans"]["nmi"] == pytest.approx(expected["nmi"])
    assert metrics["kmeans"]["acc"] < 1.0  # elongated clusters: k-means makes mistakes
    assert set(metrics["scan"]["per_class"]) == {f"class{c}" for c in range(4)}

    # kNN purity: every edge between two images with a known class, counted by hand.
    from tests.label.runs import exact_knn

    x = np.concatenate(
        [
            storage.read_parquet(u, ["embedding"])["embedding"].to_numpy(zero_copy_only=False)
            for u in storage.list_shards(str(run / "embeddings"))
        ]
    )
    x = np.stack(x).astype(np.float32)
    rows, _ = exact_knn(x, 5)
    known = keep[:, None] & keep[rows]
    same = labels[:, None] == labels[rows]
    assert metrics["knn_graph"]["purity"] == pytest.approx(
        (same & known).sum() / known.sum(), abs=1e-5
    )
    assert metrics["retrieval"] is None  # no index/ in this run

    lab = metrics["labels"]
    scored = keep  # rows with truth
    covered = scored & (np.arange(600) >= 60)
    right = covered & (np.arange(600) >= 90)
    assert lab["rows"] == scored.sum()
    assert lab["coverage"] == pytest.approx(covered.sum() / scored.sum(), abs=1e-5)
    assert lab["accuracy"] == pytest.approx(right.sum() / covered.sum(), abs=1e-5)
    assert (
        lab["without_seeds"]["rows"]
        == (scored & ((np.arange(600) < 90) | (np.arange(600) >= 100))).sum()
    )
    assert set(lab["by_source"]) == {"refs", "seed"}

    free = metrics["label_free"]
    assert free["scan"]["silhouette"] > free["kmeans"]["silhouette"] - 0.3
    assert free["scan"]["balance"]["k"] == 4
    assert 0 <= free["stability"]["mean_pairwise_ari"] <= 1


def test_label_free_only_without_truth(small_run):
    run, _, _ = small_run
    metrics = evaluate_run(
        str(run), None, silhouette_sample=200, stability_seeds=2, stability_sample=200
    )
    assert "acc" not in metrics.get("kmeans", {})
    assert metrics["label_free"]["kmeans"]["silhouette"] is not None
    assert metrics["label_free"]["stability"]["seeds"] == [100, 101]


def test_truth_that_matches_no_image_is_an_error(small_run, tmp_path):
    run, _, _ = small_run
    path = tmp_path / "other.csv"
    path.write_text("uri,label\nfile:///elsewhere/x.jpg,cat\n")
    with pytest.raises(ValueError, match="no image of the run has a label"):
        evaluate_run(str(run), str(path))
    bad = tmp_path / "bad.csv"
    bad.write_text("path,class\nx,y\n")
    with pytest.raises(ValueError, match="needs columns uri and label"):
        evaluate_run(str(run), str(bad))


def test_evaluate_command_prints_the_headline(small_run, capsys):
    from semclust.cli import main

    run, _, _ = small_run
    assert (
        main(["evaluate", "--run-dir", str(run), "--truth", "none", "--silhouette-sample", "100"])
        == 0
    )
    printed = capsys.readouterr().out  # the stage's line, the headline as JSON, the run dir
    assert printed.startswith("evaluate: ") and "label-free scores only" in printed
    out = json.loads(printed.split("\n", 1)[1].rsplit("run directory:", 1)[0])
    assert "kmeans" in out["label_free"] and "stability_ari" in out["label_free"]
    assert json.loads((run / "metrics.json").read_text())["label_free"]["kmeans"]["silhouette"]
    assert main(["evaluate", "--run-dir", str(run), "--retrieval-queries", "0"]) == 2
    assert "--retrieval-queries must be >= 1" in capsys.readouterr().err
    assert main(["evaluate", "--truth", "none"]) == 2
    assert "no run directory" in capsys.readouterr().err


def test_compare_puts_runs_of_the_same_images_side_by_side(small_run, tmp_path, capsys):
    import shutil

    from semclust.cli import main
    from semclust.compare import compare_runs, format_table

    source, ids, labels = small_run
    keep = np.ones(len(ids), dtype=bool)
    truth = _truth_file(tmp_path / "truth.parquet", ids, labels, keep)
    run, other = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for copy in (run, other):
        shutil.copytree(source, copy)
        shutil.rmtree(copy / "assignments_scan", ignore_errors=True)
    # Run a has a refined clustering too (here simply the k-means one again).
    shutil.copytree(run / "assignments", run / "assignments_scan")
    result = compare_runs([str(run), str(other)], truth, evaluate=True)
    rows = result["rows"]
    assert [(r["clustering"]) for r in rows if r["run_dir"] == str(run)] == ["kmeans", "scan"]
    assert [(r["clustering"]) for r in rows if r["run_dir"] == str(other)] == ["kmeans"]
    # The same k-means on the same images scores the same in both runs.
    first, second = (
        next(r for r in rows if r["run_dir"] == d and r["clustering"] == "kmeans")
        for d in (str(run), str(other))
    )
    assert first["nmi"] == second["nmi"] and first["run"] != second["run"]
    table = format_table(rows)
    assert table.splitlines()[0].startswith("| run | backbone |") and "| scan |" in table
    assert len(table.splitlines()) == 2 + len(rows)

    assert main(["compare", str(run), str(other), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["rows"]) == 3

    different = tmp_path / "different" / "run"
    x, _ = elongated_clusters(100, 4, 16, 1.5, 0.1, seed=9)
    make_run(different, x, 4, rows_per_part=100)
    with pytest.raises(ValueError, match="the runs hold different images"):
        compare_runs([str(run), str(different)])
