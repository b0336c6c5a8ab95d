"""Every stage under the one contract, on one real run of real images: an overwrite removes
exactly the stage's outputs and its dependents', and a stage that fails leaves ``failed`` and
its error in run.json."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semclust import runinfo, stages
from semclust.config import load_config
from semclust.rundir import layout
from semclust.runner import run_stages

ALL = [s.name for s in stages.STAGES]


def _config(run_dir: Path, images: Path, names: Path, mode: str = "resume", **extra: object):
    overrides = {
        "run_dir": str(run_dir),
        "mode": mode,
        "ray.num_cpus": 2,
        "embed.input": str(images),
        "embed.backbone": "efficientnet_lite0",
        "embed.weights": "default",
        "embed.image_size": 96,
        "embed.rows_per_part": 20,
        "cluster.k": 6,
        "graph.k": 5,
        "refine.epochs": 2,
        "refine.heads": 1,
        "refine.self_label_epochs": 0,
        "refine.num_neighbors": 5,
        "refine.dec_max_epochs": 2,
        "label.names": str(names),
        "evaluate.stability_seeds": 0,
        "evaluate.silhouette_sample": 50,
        "evaluate.retrieval_queries": 20,
        "report.map_sample": 50,
        "report.nearest": 2,
        "report.sample": 2,
    }
    overrides.update({k.replace("__", "."): v for k, v in extra.items()})
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, ray_local):
    """A run with every stage done: embed, cluster, graph, index, both heads, names, evaluate,
    report (12 photos x 3 variants + 3 unusable files)."""
    from semclust.demo import build_demo_images

    root = tmp_path_factory.mktemp("contract")
    images = root / "images"
    build_demo_images(images, per_class=3)
    names = root / "names.yaml"
    names.write_text("".join(f"{c}: group-{c}\n" for c in range(6)))
    run_dir = root / "run"
    cfg = _config(run_dir, images, names)
    order = ["embed", "cluster", "graph", "index", "refine_scan", "refine_dec", "label"]
    run_stages(cfg, [*order, "evaluate", "report"])
    return {"run": run_dir, "images": images, "names": names}


def _outputs(run_dir: Path) -> dict[str, dict[str, int]]:
    """Every stage output present: relative file path -> mtime_ns."""
    out: dict[str, dict[str, int]] = {}
    for stage in stages.STAGES:
        for name in stage.writes:
            path = run_dir / name
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            out[name] = {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in files}
    return out


def _copy(full_run: dict, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(full_run["run"], run, copy_function=shutil.copy2)
    (run / layout.RUN_LOCK).unlink(missing_ok=True)
    return run


def test_every_stage_ran_and_is_done(full_run):
    info = runinfo.load(str(full_run["run"]))
    assert {name: info["stages"][name]["status"] for name in ALL} == dict.fromkeys(ALL, "done")
    outputs = _outputs(full_run["run"])
    assert all(outputs[name] for s in stages.STAGES for name in s.writes), outputs
    for name in ALL:  # every record carries its settings and the time it took
        assert "settings" in info["stages"][name] and info["stages"][name]["seconds"] > 0


@pytest.mark.parametrize("name", ALL)
def test_overwrite_removes_exactly_the_stage_and_its_dependents(full_run, tmp_path, name):
    run = _copy(full_run, tmp_path)
    before = _outputs(run)
    stage = stages.by_name(name)
    stale = {s.name for s in stages.dependents(name)}
    cfg = _config(run, full_run["images"], full_run["names"], mode="overwrite")
    if name.startswith("refine_"):
        cfg = _config(
            run, full_run["images"], full_run["names"], "overwrite", refine__method=stage.variant
        )
    record = run_stages(cfg, [name])[name]
    assert record["status"] == "done"
    after = _outputs(run)
    info = runinfo.load(str(run))["stages"]
    for other in stages.STAGES:
        for folder in other.writes:
            if other.name == name:  # rebuilt: present, every file written again
                assert after[folder], f"{folder} was not rebuilt"
                assert not set(after[folder].items()) & set(before[folder].items())
            elif other.name in stale:  # stale: gone
                assert not after[folder], f"{folder} of {other.name} survived {name}'s overwrite"
            else:  # untouched: the very same files
                assert after[folder] == before[folder], f"{folder} changed"
    assert info[name]["status"] == "done"


def _poison_embeddings(run: Path) -> None:
    """One NaN in the first embeddings shard: same rows, same fingerprint, unusable values."""
    shard = sorted((run / layout.EMBEDDINGS).glob("part-*.parquet"))[0]
    table = pq.read_table(shard)
    values = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    values[0, 0] = np.nan
    column = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])
    index = table.schema.get_field_index("embedding")
    pq.write_table(table.set_column(index, table.schema.field(index), column), shard)


def _break(name: str, run: Path, tmp_path: Path) -> dict[str, object]:
    """A real fault for stage ``name`` that its settings() cannot see; config overrides."""
    if name == "embed":
        bad = tmp_path / "weights.pth"
        bad.write_bytes(b"not a checkpoint at all")
        return {"embed__weights": str(bad)}
    if name == "label":
        shard = sorted((run / layout.ASSIGNMENTS).glob("part-*.parquet"))[0]
        shard.write_bytes(shard.read_bytes()[:40])  # truncated
        return {}
    if name == "report":
        (run / layout.MODEL / "centroids.npy").write_bytes(b"\x93NUMPY broken")
        return {}
    _poison_embeddings(run)
    return {}


@pytest.mark.parametrize("name", ALL)
def test_a_failing_stage_is_recorded_failed_with_its_error(full_run, tmp_path, name):
    run = _copy(full_run, tmp_path)
    extra = _break(name, run, tmp_path)
    stage = stages.by_name(name)
    if stage.variant:
        extra["refine__method"] = stage.variant
    cfg = _config(run, full_run["images"], full_run["names"], mode="overwrite", **extra)
    with pytest.raises(Exception) as err:
        run_stages(cfg, [name])
    assert not type(err.value).__module__.startswith("ray."), "Ray's wrapper reached the caller"
    record = runinfo.load(str(run))["stages"][name]
    assert record["status"] == "failed", record
    assert record["error"] and type(err.value).__name__ in record["error"]
    assert not (run / layout.RUN_LOCK).exists()  # released


def test_the_python_api_runs_stages_under_the_contract(full_run, tmp_path):
    import semclust

    run = _copy(full_run, tmp_path)
    records = semclust.run(
        None,
        ["refine_dec", "evaluate"],
        run_dir=str(run),
        mode="overwrite",
        ray__num_cpus=2,
        refine__dec_max_epochs=1,
        evaluate__truth="none",
        evaluate__stability_seeds=0,
        evaluate__silhouette_sample=50,
    )
    assert list(records) == ["refine_dec", "evaluate"]
    assert records["refine_dec"]["settings"]["refine"]["method"] == "dec"  # the stage's variant
    assert records["evaluate"]["truth"] is None
    info = runinfo.load(str(run))["stages"]
    assert info["evaluate"]["settings"]["evaluate"]["truth"] == "none"
    assert not (run / layout.REPORT).exists()  # evaluate's dependent, cleared by its overwrite
