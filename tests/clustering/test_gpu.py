"""The FAISS stages on a GPU (faiss-gpu): selected with ``-m gpu``; without a GPU they fail loudly
(device=gpu refuses to fall back to the CPU)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import adjusted_rand_score

from semclust import runner
from semclust.clustering.kmeans import CentroidAssigner
from semclust.clustering.model import KMeansModel
from semclust.config import load_config
from semclust.index.search import SearchIndex
from tests.clustering.synthetic import brute_force_knn, planted, write_run

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _selected_on_purpose(request):
    """Run only under ``-m gpu``: a plain ``pytest`` on a CPU machine skips these, while
    selecting them without a GPU fails (device=gpu never falls back to the CPU)."""
    if "gpu" not in request.config.getoption("markexpr", ""):
        pytest.skip("GPU test: select it with -m gpu on a node with faiss-gpu and a GPU")


def _cfg(run_dir, **overrides):
    return load_config(None, {"run_dir": str(run_dir), "mode": "overwrite", **overrides})


def _run(stage: str, cfg) -> dict:
    return runner.run_stages(cfg, [stage])[stage]


def test_kmeans_on_gpu_recovers_the_plant_and_matches_cpu_assignment(ray_local, tmp_path):
    x, labels, _ = planted(100_000, 50, 64, noise=0.3, seed=1)
    ids = write_run(tmp_path, x, rows_per_part=25_000)
    record = _run("cluster", _cfg(tmp_path, **{"cluster.k": 50, "cluster.device": "gpu"}))
    assert record["device"] == "gpu" and record["gpus"] >= 1
    table = pq.read_table(tmp_path / "assignments")
    columns = table.to_pydict()
    cluster_of = dict(zip(columns["image_id"], columns["cluster"], strict=True))
    got = np.array([cluster_of[int(i)] for i in ids])
    assert adjusted_rand_score(labels, got) > 0.97
    model, _ = KMeansModel.load(str(tmp_path))
    cpu = CentroidAssigner(model).assign(x)[0][:, 0]
    assert (cpu == got).mean() > 0.999  # float rounding may flip exact ties only


@pytest.mark.parametrize("fp16", [False, True])
def test_exact_graph_on_gpu(ray_local, tmp_path, fp16):
    x, _, _ = planted(20_000, 40, 64, noise=0.7, seed=2)
    ids = write_run(tmp_path, x, rows_per_part=10_000)
    overrides = {"graph.method": "exact", "graph.device": "gpu", "graph.fp16": fp16}
    record = _run("graph", _cfg(tmp_path, **overrides))
    assert record["device"] == "gpu"
    table = pq.read_table(tmp_path / "knn")
    row_of = {int(i): r for r, i in enumerate(ids)}
    check = np.arange(0, 20_000, 20)
    truth = brute_force_knn(x, 10, check)
    graph_row = {int(i): r for r, i in enumerate(table["image_id"].to_pylist())}
    neighbors = np.stack(table["neighbors"].to_numpy(zero_copy_only=False))
    found = [[row_of[int(n)] for n in neighbors[graph_row[int(ids[c])]]] for c in check]
    recall = np.mean([len(np.intersect1d(f, t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall > (0.97 if fp16 else 0.999)


def test_ivf_index_searched_on_gpu(ray_local, tmp_path):
    x, _, _ = planted(50_000, 100, 64, noise=0.6, seed=3)
    write_run(tmp_path, x, rows_per_part=25_000)
    overrides = {"index.type": "ivf_flat", "index.device": "gpu", "index.recall_sample": 300}
    record = _run("index", _cfg(tmp_path, **overrides))
    assert record["build"]["gpus"] >= 1 and record["recall_at_10"] >= 0.9
    index = SearchIndex(str(tmp_path), device="gpu")
    hits = index.search_vectors(x[:5], 3)
    assert all(row[0].similarity == pytest.approx(1.0, abs=1e-3) for row in hits)
