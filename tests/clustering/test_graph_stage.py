"""The graph stage on seeded synthetic embeddings: exact graph vs brute force, IVF/HNSW recall
floors, near-duplicate groups, resume, and the summary line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from semclust import runner
from semclust.clustering import graph_stage
from semclust.config import load_config
from semclust.rundir.tables import read_knn
from tests import faults
from tests.clustering.synthetic import brute_force_knn, planted, write_run


def _cfg(run_dir, **overrides):
    return load_config(None, {"run_dir": str(run_dir), "mode": "overwrite", **overrides})


def run_graph(cfg) -> dict:
    return runner.run_stages(cfg, ["graph"])["graph"]


def _graph(run_dir) -> dict[str, np.ndarray]:
    table = pq.read_table(run_dir / "knn")
    return {
        "image_id": table["image_id"].to_numpy(),
        "neighbors": np.stack(table["neighbors"].to_numpy(zero_copy_only=False)),
        "similarities": np.stack(table["similarities"].to_numpy(zero_copy_only=False)),
    }


def test_exact_graph_equals_brute_force(ray_local, tmp_path):
    x, _, _ = planted(6_000, 30, 32, noise=0.6, seed=3)
    ids = write_run(tmp_path, x, rows_per_part=2_000)
    overrides = {"graph.k": 10, "graph.method": "exact", "graph.duplicate_threshold": "none"}
    record = run_graph(_cfg(tmp_path, **overrides))
    assert record["method"] == "exact (flat)" and record["rows"] == 6_000
    assert "recall" not in record and "duplicates" not in record
    graph = _graph(tmp_path)
    row_of = {int(i): r for r, i in enumerate(ids)}
    rows = np.array([row_of[int(i)] for i in graph["image_id"]])
    assert sorted(rows.tolist()) == list(range(6_000))
    xn = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float64)
    expected = brute_force_knn(x, 10)
    expected_sims = np.take_along_axis(xn @ xn.T, expected, axis=1)[rows]  # 6k x 6k is small
    np.testing.assert_allclose(graph["similarities"], expected_sims, atol=1e-5)
    got_rows = np.vectorize(row_of.get)(graph["neighbors"])
    assert (got_rows != rows[:, None]).all()  # never the row itself
    # The same neighbours, ties aside: their true similarities are the expected ones.
    got_sims = np.einsum("ij,ikj->ik", xn[rows], xn[got_rows])
    np.testing.assert_allclose(got_sims, expected_sims, atol=1e-5)
    assert (np.diff(graph["similarities"], axis=1) <= 1e-6).all()  # nearest first


@pytest.mark.parametrize("method", ["ivf", "hnsw"])
def test_approximate_graph_meets_its_recall_floor(ray_local, tmp_path, method):
    x, _, _ = planted(20_000, 60, 32, noise=0.7, seed=5)
    ids = write_run(tmp_path, x, rows_per_part=10_000)
    overrides = {
        "graph.k": 10,
        "graph.method": method,
        "graph.target_recall": 0.95,
        "graph.min_recall": 0.9,
        "graph.recall_sample": 500,
        "graph.duplicate_threshold": "none",
        "graph.batch_memory": "1MB",  # 8,192 rows of 32-d: several batches, two per shard
    }
    record = run_graph(_cfg(tmp_path, **overrides))
    assert record["status"] == "done" and record["rows"] == 20_000
    assert record["recall"]["queries"] == 500
    recorded = record["recall"]["recall_at_k"]
    assert recorded >= 0.9
    # The depth is the smallest that reached the target on the tuning sample.
    depth = record["nprobe" if method == "ivf" else "ef_search"]
    tuning = record["tuning"]
    assert tuning["chosen_by"] == "target_recall" and tuning["queries"] == 500
    assert tuning["tried"][-1][0] == depth and tuning["tried"][-1][1] >= 0.95
    assert all(r < 0.95 for _, r in tuning["tried"][:-1])
    if method == "ivf":
        assert record["search"] == "bucketed" and record["batches"] == 2  # one shard each
    assert not (tmp_path / "knn" / ".graph-index").exists()  # the temporary index is gone
    # Our own recall@10 on other rows, against float64 brute force.
    graph = _graph(tmp_path)
    row_of = {int(i): r for r, i in enumerate(ids)}
    rng = np.random.default_rng(0)
    check = rng.choice(len(ids), 1_000, replace=False)
    truth = brute_force_knn(x, 10, check)  # rows are ids' positions
    graph_row = {int(i): r for r, i in enumerate(graph["image_id"])}
    found = np.vectorize(row_of.get)(graph["neighbors"][[graph_row[int(ids[c])] for c in check]])
    own = np.mean([len(np.intersect1d(f, t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert own >= 0.9
    assert abs(own - recorded) < 0.05
    info = json.loads((tmp_path / "run.json").read_text())["stages"]["graph"]
    assert info["recall"]["recall_at_k"] == recorded
    assert graph_stage.summary(record) == f"k=10 {method}, 20000 rows, recall@k {recorded}"


def test_recall_under_the_floor_fails_the_stage(ray_local, tmp_path):
    x, _, _ = planted(20_000, 60, 32, noise=0.9, seed=6)
    write_run(tmp_path, x, rows_per_part=10_000)
    overrides = {
        "graph.method": "ivf",
        "graph.nlist": 256,
        "graph.nprobe": 1,  # set: not tuned
        "graph.min_recall": 0.99,
        "graph.recall_sample": 200,
    }
    with pytest.raises(RuntimeError, match=r"under graph\.min_recall=0\.99"):
        run_graph(_cfg(tmp_path, **overrides))
    info = json.loads((tmp_path / "run.json").read_text())["stages"]["graph"]
    assert info["status"] == "failed" and info["recall"]["recall_at_k"] < 0.99
    assert info["nprobe"] == 1 and info["tuning"] == {"chosen_by": "config"}


def test_duplicates_for_planted_near_copies_and_none_for_distinct(ray_local, tmp_path):
    rng = np.random.default_rng(4)
    base = rng.normal(size=(3_000, 64)).astype(np.float32)  # random 64-d: cosines < 0.7
    sizes = rng.integers(1, 4, size=40)  # copies per original: groups of 2 to 4
    originals = rng.choice(len(base), size=40, replace=False)
    copies = np.concatenate(
        [base[o] + 1e-3 * rng.normal(size=(s, 64)) for o, s in zip(originals, sizes, strict=True)]
    ).astype(np.float32)
    ids = write_run(tmp_path / "dup", np.concatenate([base, copies]), rows_per_part=1_000)
    record = run_graph(_cfg(tmp_path / "dup", **{"graph.k": 5, "graph.duplicate_threshold": 0.99}))
    planted_groups, offset = set(), len(base)
    for o, s in zip(originals, sizes, strict=True):
        members = [ids[o], *ids[offset : offset + s]]
        planted_groups.add(frozenset(int(i) for i in members))
        offset += s
    table = pq.read_table(tmp_path / "dup" / "duplicates")
    found: dict[int, set[int]] = {}
    columns = table.to_pydict()
    for image_id, group in zip(columns["image_id"], columns["group"], strict=True):
        found.setdefault(group, set()).add(image_id)
    assert {frozenset(g) for g in found.values()} == planted_groups
    assert all(group == min(members) for group, members in found.items())
    summary = record["duplicates"]
    assert summary["groups"] == 40 and summary["images"] == int((sizes + 1).sum())
    largest = summary["largest"]
    assert largest[0]["size"] == int(sizes.max()) + 1
    assert [g["size"] for g in largest] == sorted((g["size"] for g in largest), reverse=True)
    assert all(u.startswith("file:///synthetic/") for u in largest[0]["examples"])

    write_run(tmp_path / "distinct", base, rows_per_part=1_000)
    record = run_graph(
        _cfg(tmp_path / "distinct", **{"graph.k": 5, "graph.duplicate_threshold": 0.99})
    )
    assert record["duplicates"]["groups"] == 0
    parts = sorted(p.name for p in (tmp_path / "distinct" / "duplicates").iterdir())
    assert parts == ["part-00000.parquet"]
    assert pq.read_table(tmp_path / "distinct" / "duplicates").num_rows == 0


def test_resume_searches_only_missing_parts_and_keeps_a_finished_graph(ray_local, tmp_path):
    x, _, _ = planted(3_000, 10, 16, noise=0.5, seed=12)
    write_run(tmp_path, x, rows_per_part=1_000)
    cfg = load_config(None, {"run_dir": str(tmp_path), "graph.k": 5, "graph.method": "exact"})
    first = run_graph(cfg)
    groups = first["duplicates"]["groups"]
    assert graph_stage.summary(first) == f"k=5 exact (flat), 3000 rows, {groups} duplicate groups"
    assert run_graph(cfg) == first  # already done: the same record, nothing searched again
    ids, neighbors, sims = read_knn(str(tmp_path))
    kept = tmp_path / "knn" / "part-00000.parquet"
    stamp = kept.stat().st_mtime_ns
    (tmp_path / "knn" / "part-00001.parquet").unlink()
    again = run_graph(cfg)
    assert again["rows"] == 3_000 and again["seconds"] != first["seconds"]
    assert kept.stat().st_mtime_ns == stamp  # a committed part is not searched again
    ids2, neighbors2, sims2 = read_knn(str(tmp_path))
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(neighbors2, neighbors)
    np.testing.assert_array_equal(sims2, sims)
    # Other settings: every part searched again, with the new k.
    other = run_graph(load_config(None, {"run_dir": str(tmp_path), "graph.k": 3}))
    assert other["k"] == 3 and read_knn(str(tmp_path))[1].shape == (3_000, 3)


def test_too_few_images_stop_before_anything_runs(tmp_path):
    write_run(tmp_path, planted(1, 1, 8, noise=0.1, seed=0)[0], rows_per_part=1)
    before = (tmp_path / "run.json").read_text()
    with pytest.raises(ValueError, match="a kNN graph needs at least 2 embedded images"):
        run_graph(_cfg(tmp_path))
    assert (tmp_path / "run.json").read_text() == before


def test_a_killed_ivf_graph_resumes_to_the_uninterrupted_graph(tmp_path):
    """SIGKILL the whole job (driver and Ray) once the IVF index is stored, before any part is
    searched; the rerun uses the stored index, tunes to the same depth and writes the same graph
    as a run never interrupted."""
    x, _, _ = planted(12_000, 60, 32, noise=1.2, seed=8)
    runs = {name: tmp_path / name for name in ("killed", "whole")}
    for run_dir in runs.values():
        write_run(run_dir, x, rows_per_part=3_000)
    env = {**os.environ, "RAY_ADDRESS": "local"}

    def cmd(run_dir):
        return [
            sys.executable,
            "-m",
            "semclust.cli",
            "graph",
            "--run-dir",
            str(run_dir),
            "--graph-method",
            "ivf",
            "--set",
            "graph.recall_sample=300",
        ]

    index = runs["killed"] / "knn" / ".graph-index" / "index.faiss"
    proc = faults.start_and_wait(cmd(runs["killed"]), env, lambda _pid: index.exists())
    faults.stop_group(proc)
    assert index.exists() and not list((runs["killed"] / "knn").glob("part-*.parquet"))
    for run_dir in runs.values():
        done = subprocess.run(cmd(run_dir), env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    records = {
        name: json.loads((d / "run.json").read_text())["stages"]["graph"]
        for name, d in runs.items()
    }
    assert "index_build" not in records["killed"]  # the stored index was used, not rebuilt
    assert "index_build" in records["whole"]
    assert records["killed"]["nprobe"] == records["whole"]["nprobe"]
    assert records["killed"]["recall"]["recall_at_k"] == records["whole"]["recall"]["recall_at_k"]
    killed, whole = read_knn(str(runs["killed"])), read_knn(str(runs["whole"]))
    for got, want in zip(killed, whole, strict=True):
        np.testing.assert_array_equal(got, want)
    assert not index.exists()
