"""The refine stage: SCAN and DEC heads written next to the k-means assignments, resume, the
checks made before anything runs, and the command line."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from semclust import runner
from semclust.clustering import refine_stage
from semclust.config import RayConfig, RefineConfig, RunConfig
from tests.clustering.synthetic import planted, write_run
from tests.label.runs import elongated_clusters, make_run


def run_refine(run_dir, rc: RefineConfig) -> dict:
    """The refine stage of ``rc.method`` (``refine_scan`` / ``refine_dec``) on a run."""
    cfg = RunConfig(run_dir=str(run_dir), refine=rc, ray=RayConfig(num_cpus=2))
    name = f"refine_{rc.method}"
    return runner.run_stages(cfg, [name])[name]


def test_a_run_without_a_model_is_refused_with_what_to_run(tmp_path):
    x, _, _ = planted(100, 2, 8, noise=0.3, seed=0)
    write_run(tmp_path, x, rows_per_part=100)
    with pytest.raises(ValueError, match=r"has no complete k-means model: run `semclust cluster`"):
        run_refine(tmp_path, RefineConfig(method="dec"))


@pytest.mark.slow
def test_refine_stage_writes_scan_assignments_next_to_kmeans(ray_local, tmp_path):
    run = tmp_path / "run"
    x, labels = elongated_clusters(900, 4, 16, 1.5, 0.1, seed=2)
    ids = make_run(run, x, 4, rows_per_part=400, knn_k=10, neighbour_noise=0.1)
    kmeans_before = {p.name: p.read_bytes() for p in (run / "assignments").iterdir()}
    rc = RefineConfig(
        method="scan", epochs=8, batch_size=128, hidden=32, heads=2, self_label_epochs=1
    )
    record = run_refine(run, rc)

    assert record["status"] == "done" and record["output"] == "assignments_scan"
    assert {p.name: p.read_bytes() for p in (run / "assignments").iterdir()} == kmeans_before
    names = sorted(p.name for p in (run / "assignments_scan").iterdir())
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = pq.read_table(run / "assignments_scan")
    assert table.schema == pq.read_table(run / "assignments").schema
    assert sorted(table["image_id"].to_pylist()) == sorted(ids.tolist())
    dist = table["distance"].to_numpy()
    assert ((dist >= 0) & (dist <= 1)).all()
    assert (dist <= table["distance_2nd"].to_numpy()).all()
    assert (table["cluster"].to_numpy() != table["cluster_2nd"].to_numpy()).all()
    # Renumbered to agree with k-means where they overlap most.
    assert record["agreement_with_kmeans"] > 0.5

    info = json.loads((run / "run.json").read_text())
    stage = info["stages"]["refine_scan"]
    assert stage["k"] == 4 and len(stage["loss_curve"]["scan"]) == 8
    assert info["config"]["refine"]["epochs"] == 8
    assert refine_stage.summary(record) == (
        f"k=4, 900 rows -> assignments_scan/, sizes {record['cluster_sizes']}"
    )
    # Same settings again: resume keeps the result and trains nothing.
    again = run_refine(run, rc)
    assert again["seconds"] == record["seconds"]
    assert labels.shape == (900,)


@pytest.mark.slow
def test_refine_stage_writes_dec_assignments(ray_local, tmp_path):
    run = tmp_path / "run"
    x, _, _ = planted(800, 4, 16, noise=0.6, seed=4)
    ids = make_run(run, x, 4, rows_per_part=300, knn_k=5)
    with pytest.raises(ValueError, match="DEC starts from the k-means centroids"):
        run_refine(run, RefineConfig(method="dec", k=6))
    assert not (run / "assignments_dec").exists()  # refused before anything ran
    record = run_refine(run, RefineConfig(method="dec", dec_max_epochs=5))
    assert record["output"] == "assignments_dec" and record["k"] == 4
    table = pq.read_table(run / "assignments_dec")
    assert sorted(table["image_id"].to_pylist()) == sorted(ids.tolist())
    assert len(list((run / "assignments_dec").iterdir())) == 3
    # DEC starts from the k-means centroids: cluster numbers keep their meaning.
    kmeans = pq.read_table(run / "assignments").to_pydict()
    dec = dict(zip(table["image_id"].to_pylist(), table["cluster"].to_pylist(), strict=True))
    agree = np.mean(
        [dec[i] == c for i, c in zip(kmeans["image_id"], kmeans["cluster"], strict=True)]
    )
    assert agree > 0.9
    info = json.loads((run / "run.json").read_text())["stages"]["refine_dec"]
    assert info["status"] == "done" and info["loss_curve"]["dec"][0]["update"] == 0


@pytest.mark.slow
def test_refine_command_and_overwrite_of_its_inputs(ray_local, tmp_path, capsys):
    """`semclust refine` through the CLI; overwriting the clusters removes the head's now stale
    assignments but keeps the kNN graph, which does not read the clusters."""
    from semclust.cli import main

    run = tmp_path / "run"
    x, _, _ = planted(600, 3, 12, noise=0.5, seed=8)
    make_run(run, x, 3, rows_per_part=300, knn_k=5)
    argv = ["refine", "--run-dir", str(run), "--method", "dec", "--dec-max-epochs", "2"]
    assert main(argv) == 0
    assert "refine dec: k=3, 600 rows -> assignments_dec/" in capsys.readouterr().out
    assert len(list((run / "assignments_dec").iterdir())) == 2
    assert main(["refine", "--run-dir", str(run), "--method", "scan", "--heads", "0"]) == 2
    assert "refine.heads must be > 0" in capsys.readouterr().err
    assert main(["cluster", "--run-dir", str(run), "--k", "3", "--mode", "overwrite"]) == 0
    assert not (run / "assignments_dec").exists()
    assert len(list((run / "knn").iterdir())) == 2
    assert len(list((run / "assignments").iterdir())) == 2


def test_refine_flags_map_to_the_config(tmp_path):
    from semclust.cli import build_parser, config_from_args

    def parse(*flags: str) -> RefineConfig:
        args = build_parser().parse_args(["refine", "--run-dir", str(tmp_path), *flags])
        return config_from_args(args).refine

    assert parse("--method", "dec", "--dec-tolerance", "0.01") == RefineConfig(
        method="dec", dec_tolerance=0.01
    )
    assert parse() == RefineConfig()
    assert parse("--k", "7", "--epochs", "3", "--seed", "5") == RefineConfig(k=7, epochs=3, seed=5)
    with pytest.raises(ValueError, match="confidence_threshold must be in"):
        parse("--confidence-threshold", "2")
    with pytest.raises(ValueError, match=r"refine\.method='kmeans' is not allowed"):
        parse("--method", "kmeans")
