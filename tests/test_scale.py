"""Every stage after embed on a 200,000-row run, through the command line: the size at which a
stage that holds all rows in one process, or a search tuned to nothing, shows (benchmarks/
scale_10m.py runs the same stages at 10^5 to 10^7 and times them; this checks what they make).

Planted data with truth, so each stage's output is checked against something the test computes
itself: the clusters against the planted centres, the kNN graph and the budget-bound index
against exact search, the labels from 1% seeds against the truth, evaluate's scores against the
test's own, and the report's size against its sampling.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import normalized_mutual_info_score

from semclust.cli import main
from semclust.index.search import SearchIndex
from semclust.rundir.labels import read_labels
from semclust.rundir.tables import read_assignments, read_knn
from tests.clustering.synthetic import brute_force_knn, planted, write_run

pytestmark = pytest.mark.slow

N, CENTRES, DIM, KNN_K = 200_000, 100, 64, 10
PROBES = 300  # rows whose exact neighbours the test computes


@pytest.fixture(scope="module")
def grown(ray_local, tmp_path_factory):
    """The run directory after cluster, graph, index (under a budget only PQ fits), refine, label,
    evaluate and report, each as ``semclust STAGE``; the data and their truth."""
    root = tmp_path_factory.mktemp("scale")
    run = root / "run"
    x, labels, _ = planted(N, CENTRES, DIM, noise=0.9, seed=21)
    ids = write_run(run, x, rows_per_part=25_000)
    uris = [f"file:///synthetic/img-{i:07d}.jpg" for i in range(N)]
    names = np.array([f"c{c:03d}" for c in range(CENTRES)])
    truth = root / "truth.parquet"
    pq.write_table(pa.table({"uri": uris, "label": names[labels]}), truth)
    rng = np.random.default_rng(5)
    seeded = np.sort(rng.choice(N, N // 100, replace=False))
    seeds = root / "seeds.parquet"
    pq.write_table(
        pa.table({"uri": [uris[i] for i in seeded], "label": names[labels[seeded]]}), seeds
    )
    flat_mb = N * DIM * 4 / 2**20  # 49 MB: a 12 MB budget leaves IVF-PQ (+ re-rank on disk)
    stages = [
        ["cluster", "--k", str(CENTRES)],
        ["graph", "--set", "graph.duplicate_threshold=none"],
        ["index", "--index-memory", f"{flat_mb / 4:.0f}MB"],
        ["refine", "--method", "scan", "--epochs", "2", "--self-label-epochs", "1"],
        ["label", "--seed-labels", str(seeds)],
        ["evaluate", "--truth", str(truth)],
        ["report"],
    ]
    for stage in stages:
        assert main([stage[0], "--run-dir", str(run), *stage[1:]]) == 0, stage
    return run, x, labels, ids, seeded


def _in_id_order(table: pa.Table, ids: np.ndarray, column: str) -> np.ndarray:
    order = {int(i): r for r, i in enumerate(table["image_id"].to_pylist())}
    return table[column].to_numpy()[[order[int(i)] for i in ids]]


def test_every_stage_finished_and_every_row_is_in_each_output(grown):
    run, _, _, ids, _ = grown
    stages = json.loads((run / "run.json").read_text())["stages"]
    for name in ("cluster", "graph", "index", "refine_scan", "label", "evaluate", "report"):
        assert stages[name]["status"] == "done", name
    for folder in ("assignments", "assignments_scan"):
        got = read_assignments(str(run), folder)["image_id"].to_numpy()
        assert len(got) == N and set(got.tolist()) == set(ids.tolist()), folder
    g_ids, _, _ = read_knn(str(run))
    assert len(g_ids) == N and len(set(g_ids.tolist())) == N


def test_clusters_and_the_scan_head_recover_the_planted_centres(grown):
    run, _, labels, ids, _ = grown
    kmeans = _in_id_order(read_assignments(str(run)), ids, "cluster")
    scan = _in_id_order(read_assignments(str(run), "assignments_scan"), ids, "cluster")
    nmi_kmeans = normalized_mutual_info_score(labels, kmeans)
    assert nmi_kmeans > 0.95
    assert normalized_mutual_info_score(labels, scan) > 0.9
    # evaluate scored the same clusters against the same truth.
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["kmeans"]["n"] == N
    assert metrics["kmeans"]["nmi"] == pytest.approx(nmi_kmeans, abs=1e-3)


def test_the_graph_reaches_its_recall_target_against_exact_search(grown):
    run, x, _, ids, _ = grown
    record = json.loads((run / "run.json").read_text())["stages"]["graph"]
    g_ids, neighbours, _ = read_knn(str(run))
    probes = np.random.default_rng(8).choice(N, PROBES, replace=False)
    exact = brute_force_knn(x, KNN_K, probes)
    row_of = {int(i): r for r, i in enumerate(g_ids)}
    id_row = {int(i): r for r, i in enumerate(ids)}
    found = [[id_row[int(j)] for j in neighbours[row_of[int(ids[p])]]] for p in probes]
    recall = np.mean([len(np.intersect1d(f, e)) / KNN_K for f, e in zip(found, exact, strict=True)])
    assert recall >= 0.95, recall
    held_out = record["recall"]["recall_at_k"]
    assert held_out >= 0.95  # the stage's own held-out figure agrees
    assert abs(held_out - recall) < 0.03, (held_out, recall)


def test_the_budget_bound_index_is_accurate_with_reranking(grown):
    run, x, _, ids, _ = grown
    meta = json.loads((run / "index" / "meta.json").read_text())
    assert meta["type"] == "ivf_pq" and meta["memory_estimate_bytes"] <= N * DIM  # under 1/4
    assert meta["rerank"] is not None and meta["recall_at_10"] >= 0.9
    probes = np.random.default_rng(9).choice(N, PROBES, replace=False)
    exact = brute_force_knn(x, KNN_K, probes, exclude_self=False)
    index = SearchIndex(str(run), device="cpu")
    queries = x[probes] / np.linalg.norm(x[probes], axis=1, keepdims=True)
    hits = index.search_vectors(queries.astype(np.float32), KNN_K)
    found = [[h.image_id for h in row] for row in hits]
    recall = np.mean(
        [len(np.intersect1d(f, ids[e])) / KNN_K for f, e in zip(found, exact, strict=True)]
    )
    assert recall >= 0.9, recall


def test_labels_from_one_percent_of_seeds_are_right_on_the_rest(grown):
    run, _, labels, ids, seeded = grown
    table = read_labels(str(run))
    assert table is not None and len(table) == N
    got = _in_id_order(table, ids, "label")
    rest = np.setdiff1d(np.arange(N), seeded)
    accuracy = float((got[rest] == np.array([f"c{c:03d}" for c in labels[rest]])).mean())
    assert accuracy > 0.95, accuracy


def test_the_report_samples_instead_of_showing_every_row(grown):
    run, *_ = grown
    report = run / "report"
    size = sum(p.stat().st_size for p in report.rglob("*") if p.is_file())
    # Every one of 200,000 rows listed would be tens of MB; galleries and the map are sampled.
    assert (report / "index.html").exists() and size < 15 << 20, size
