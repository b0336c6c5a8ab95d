"""`semclust add` end to end on real photos and a real local Ray: a run on half of a labelled
set grown by the other half, against a run on all of it."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from semclust import storage
from semclust.cli import main
from semclust.rundir.embeddings import read_embeddings
from semclust.rundir.tables import read_duplicates, read_knn_part

pytestmark = pytest.mark.slow

K = 12
COMMON = [
    "--backbone",
    "efficientnet_lite0",
    "--weights",
    "default",
    "--k",
    str(K),
    "--knn-k",
    "5",
    "--rows-per-part",
    "10",
    "--batch-size",
    "16",
]


def _parts(run: Path, folder: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / folder).glob("part-*.parquet"))}


def _table(run: Path, folder: str, columns: list[str] | None = None) -> dict[str, list]:
    out: dict[str, list] = {}
    for p in sorted((run / folder).glob("part-*.parquet")):
        t = pq.read_table(p, columns=columns).to_pydict()
        for key, values in t.items():
            out.setdefault(key, []).extend(values)
    return out


def _knn_by_id(run: Path) -> dict[int, tuple[list[int], np.ndarray]]:
    out = {}
    for p in sorted((run / "knn").glob("part-*.parquet")):
        part = read_knn_part(str(p))
        for i, image_id in enumerate(part.ids.tolist()):
            out[image_id] = (part.neighbors[i].tolist(), part.similarities[i])
    return out


def _cluster_of(run: Path, image: Path) -> int:
    table = _table(run, "embeddings", ["image_id", "uri"])
    image_id = table["image_id"][table["uri"].index(f"file://{image}")]
    assignments = _table(run, "assignments", ["image_id", "cluster"])
    return assignments["cluster"][assignments["image_id"].index(image_id)]


def _run_json(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


@pytest.fixture(scope="module")
def halves(demo_images, tmp_path_factory) -> Path:
    """all/first/<class>/ (3 photos a class), all/second/<class>/ (the other 3, and the
    unusable files); a seed labels file naming 2 first-half photos a class and one second-half
    photo."""
    root = tmp_path_factory.mktemp("grow") / "all"
    seeds = []
    for class_dir in sorted(p for p in demo_images.iterdir() if p.is_dir()):
        files = sorted(class_dir.iterdir())
        if class_dir.name == "_unusable":
            (root / "second" / "_unusable").mkdir(parents=True)
            for f in files:
                shutil.copy(f, root / "second" / "_unusable" / f.name)
            continue
        for half, chosen in (("first", files[:3]), ("second", files[3:6])):
            (root / half / class_dir.name).mkdir(parents=True)
            for f in chosen:
                shutil.copy(f, root / half / class_dir.name / f.name)
        seeds += [(root / "first" / class_dir.name / f.name, class_dir.name) for f in files[:2]]
    coffee = sorted((root / "second" / "coffee").iterdir())[0]
    seeds.append((coffee, "coffee"))
    with open(root.parent / "seeds.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "label"])
        writer.writerows((f"file://{p}", label) for p, label in seeds)
    return root


def _label(run: Path, seeds: Path) -> None:
    assert main(["label", "--run-dir", str(run), "--seed-labels", str(seeds)]) == 0


@pytest.fixture(scope="module")
def grown(ray_local, halves, tmp_path_factory) -> dict:
    """A run on the first half, labelled; its state; then `semclust add` of the second half."""
    run = tmp_path_factory.mktemp("grown") / "run"
    seeds = halves.parent / "seeds.csv"
    assert main(["run", str(halves / "first"), "--run-dir", str(run), *COMMON]) == 0
    _label(run, seeds)
    before = {
        "assignments": _parts(run, "assignments"),
        "labels": _table(run, "labels"),
        "run": _run_json(run),
        "duplicates": read_duplicates(str(run)),
    }
    assert main(["add", str(halves / "second"), "--run-dir", str(run)]) == 0
    return {"run": run, "before": before, "record": _run_json(run)["stages"]["add"]}


@pytest.fixture(scope="module")
def full(ray_local, halves, tmp_path_factory) -> Path:
    """One run on every image, both halves at once."""
    run = tmp_path_factory.mktemp("full") / "run"
    assert main(["run", str(halves), "--run-dir", str(run), *COMMON]) == 0
    return run


def test_the_first_halfs_clusters_and_labels_are_unchanged(grown):
    run, before = grown["run"], grown["before"]
    after = _parts(run, "assignments")
    for name, data in before["assignments"].items():
        assert after[name] == data, f"assignments/{name} changed"
    assert len(after) > len(before["assignments"])
    labels = _table(run, "labels")
    n_old = len(before["labels"]["image_id"])
    old = {k: v[:n_old] for k, v in labels.items()}
    assert old == before["labels"]
    model_before = before["run"]["stages"]["cluster"]["settings"]["cluster"]
    assert _run_json(run)["stages"]["cluster"]["settings"]["cluster"] == model_before


def test_added_rows_are_assigned_as_the_centroids_assign_them(grown):
    from semclust.clustering.kmeans import CentroidAssigner
    from semclust.clustering.model import KMeansModel

    run, record = grown["run"], grown["record"]
    model, _ = KMeansModel.load(str(run))
    assigner = CentroidAssigner(model, gpus=0)
    new_parts = sorted(set(_parts(run, "assignments")) - set(grown["before"]["assignments"]))
    assert len(new_parts) == record["parts_added"] > 0
    rows = 0
    for name in new_parts:
        ids, vectors = read_embeddings(str(run / "embeddings" / name))
        clusters, _ = assigner.assign(vectors)
        got = pq.read_table(run / "assignments" / name)
        np.testing.assert_array_equal(got["image_id"].to_numpy(), ids)
        np.testing.assert_array_equal(got["cluster"].to_numpy(), clusters[:, 0])
        rows += len(ids)
    # 36 photos embedded, the 3 unusable files failed; listed = embedded + failed.
    assert rows == record["rows_added"] == 36
    assert record["embed"] == {
        "listed": 39,
        "embedded": 36,
        "failed": 3,
        "already_committed": 0,
        "processed_this_run": 39,
    }
    assert len(list((run / "failures").glob("part-*.parquet"))) >= 1


def test_the_grown_graph_equals_the_graph_of_a_full_run(grown, full):
    grown_knn, full_knn = _knn_by_id(grown["run"]), _knn_by_id(full)
    assert set(grown_knn) == set(full_knn) and len(full_knn) == 72
    for image_id, (neighbors, sims) in full_knn.items():
        got, got_sims = grown_knn[image_id]
        assert got == neighbors, image_id
        np.testing.assert_allclose(got_sims, sims, atol=1e-5)
    record = grown["record"]["graph"]
    assert record["rows_added"] == 36 and record["old_rows_changed"] > 0


def test_the_index_finds_added_images_and_holds_every_row(grown, halves):
    from semclust.index.search import SearchIndex

    run = grown["run"]
    index = SearchIndex(str(run))
    assert index.index.ntotal == 72 == len(index.image_ids)
    queries = [str(p) for p in sorted((halves / "second").glob("*/*-00[345].*"))][:6]
    assert len(queries) == 6
    for query, hits in zip(queries, index.search_images(queries, 1), strict=True):
        assert hits[0].uri == f"file://{query}"
        assert hits[0].similarity > 0.999
    meta = json.loads((run / "index" / "meta.json").read_text())
    assert meta["count"] == 72 and meta["grown"][-1]["rows_added"] == 36


def test_added_images_are_labelled_by_the_label_stages_rules(grown, halves):
    run = grown["run"]
    labels = _table(run, "labels")
    uris = dict(zip(*_table(run, "embeddings", ["image_id", "uri"]).values(), strict=True))
    n_old = len(grown["before"]["labels"]["image_id"])
    added = [
        (uris[i], label, source)
        for i, label, source in zip(
            labels["image_id"][n_old:],
            labels["label"][n_old:],
            labels["source"][n_old:],
            strict=True,
        )
    ]
    assert len(added) == 36
    seeded = [a for a in added if a[2] == "seed"]
    assert len(seeded) == 1 and "/second/coffee/" in seeded[0][0] and seeded[0][1] == "coffee"
    method = _run_json(run)["stages"]["label"]["method"]
    assert {a[2] for a in added} - {"seed"} == {method}
    right = [Path(uri.removeprefix("file://")).parent.name == label for uri, label, _ in added]
    assert np.mean(right) >= 0.9


def test_drift_and_the_report_show_the_added_images(grown):
    run, record = grown["run"], grown["record"]
    drift = record["drift"]
    assert drift["rows"] == 36 and 0 <= drift["share_beyond"] <= 1
    assert drift["expected_share"] == pytest.approx(0.01)
    page = (run / "report" / "index.html").read_text()
    assert "Images added" in page and "/second" in page
    assert record["runs"][-1]["rows_added"] == 36


def test_the_grown_run_resumes_as_finished(grown, halves):
    """The stages' records took the grown embeddings as theirs: `semclust run` on the first
    half's input in resume mode finds nothing to do and keeps every id."""
    from semclust.index.search import SearchIndex

    run = grown["run"]
    before = _parts(run, "assignments"), _parts(run, "knn")
    index_bytes = (run / "index" / "index.faiss").read_bytes()
    assert main(["run", str(halves / "first"), "--run-dir", str(run), *COMMON]) == 0
    assert (run / "index" / "index.faiss").read_bytes() == index_bytes
    assert SearchIndex(str(run)).index.ntotal == 72
    info = _run_json(run)
    assert info["stages"]["graph"]["rows"] == info["stages"]["cluster"]["rows"] == 72
    duplicates = read_duplicates(str(run))
    old = grown["before"]["duplicates"]
    if old is not None and len(old[0]):
        got = dict(zip(duplicates[0].tolist(), duplicates[1].tolist(), strict=True))
        for image_id, group in zip(*(a.tolist() for a in old), strict=True):
            assert got[image_id] == group
    assert before == (_parts(run, "assignments"), _parts(run, "knn"))


def test_adding_the_same_input_again_adds_nothing(grown, halves):
    run = grown["run"]
    state = {f: _parts(run, f) for f in ("embeddings", "assignments", "knn", "labels")}
    index_bytes = (run / "index" / "index.faiss").read_bytes()
    assert main(["add", str(halves / "second"), "--run-dir", str(run)]) == 0
    record = _run_json(run)["stages"]["add"]
    assert record["rows_added"] == 0 and record["embed"]["already_committed"] == 39
    assert len(record["runs"]) == 2
    assert state == {f: _parts(run, f) for f in state}
    assert (run / "index" / "index.faiss").read_bytes() == index_bytes


def test_add_errors_say_what_to_do(ray_local, halves, tmp_path, capsys):
    assert main(["add", str(halves / "second"), "--run-dir", str(tmp_path / "none")]) == 2
    assert "semclust run" in capsys.readouterr().err
    storage.write_json(str(tmp_path / "embedded" / "run.json"), {"stages": {}})
    assert main(["add", str(halves / "second"), "--run-dir", str(tmp_path / "embedded")]) == 2
    assert "no finished embed stage" in capsys.readouterr().err


def test_a_stopped_add_is_finished_by_the_same_command(
    ray_local, halves, full, tmp_path, monkeypatch
):
    """Ctrl-C after the added images were embedded, before they were assigned: the same `add`
    again (with nothing left to embed) assigns them and grows the graph (through the clusters
    here, as for a large run), the index and the labels from the parts the first one was
    adding. The run is labelled from reference images
    with one cluster named, so the added images take the refs and the names rules."""
    import semclust.clustering.assign as assign

    run = tmp_path / "run"
    assert main(["run", str(halves / "first"), "--run-dir", str(run), *COMMON]) == 0
    refs = tmp_path / "refs"
    for class_dir in sorted((halves / "first").iterdir()):
        (refs / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:2]:
            shutil.copy(f, refs / class_dir.name / f.name)
    coffee_cluster = _cluster_of(run, sorted((halves / "first" / "coffee").iterdir())[0])
    (tmp_path / "names.yaml").write_text(f"{coffee_cluster}: mugs\n")
    labelled = ["label", "--run-dir", str(run), "--refs", str(refs)]
    assert main([*labelled, "--names", str(tmp_path / "names.yaml")]) == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(assign, "assign_shards", interrupted)
        assert main(["add", str(halves / "second"), "--run-dir", str(run)]) == 130
    record = _run_json(run)["stages"]["add"]
    assert record["status"] == "interrupted" and len(record["pending_parts"]) == 4
    assert json.loads((run / "index" / "meta.json").read_text())["count"] == 36
    assert len(list((run / "embeddings").glob("part-*"))) == 8
    assert len(list((run / "assignments").glob("part-*"))) == 4
    # In a fresh process, as a user reruns it: nothing is left to embed, so the add itself
    # starts Ray.
    again = [sys.executable, "-m", "semclust.cli", "add", str(halves / "second")]
    again += ["--run-dir", str(run), "--num-cpus", "2", "--set", "add.graph_search=clusters"]
    done = subprocess.run(again, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "add: 36 images added (3 failed)" in done.stdout
    record = _run_json(run)["stages"]["add"]
    assert record["status"] == "done" and record["rows_added"] == 36
    graph = record["graph"]
    assert graph["search"].startswith("within clusters")
    assert graph["recall"]["queries"] == 36 and graph["recall"]["recall_at_k"] >= 0.95
    assert json.loads((run / "index" / "meta.json").read_text())["count"] == 72
    assert record["labels"]["rule"] == "refs + names"
    labels = _table(run, "labels")
    uris = dict(zip(*_table(run, "embeddings", ["image_id", "uri"]).values(), strict=True))
    second = [
        (Path(uris[i].removeprefix("file://")).parent.name, label, source)
        for i, label, source in zip(
            labels["image_id"], labels["label"], labels["source"], strict=True
        )
        if "/second/" in uris[i]
    ]
    assert len(second) == 36
    assert {(c, lab, src) for c, lab, src in second if c == "coffee"} == {
        ("coffee", "mugs", "names")
    }
    others = [(c, lab, src) for c, lab, src in second if c != "coffee"]
    assert {src for _, _, src in others} == {"refs"}
    assert np.mean([c == lab for c, lab, _ in others]) >= 0.9
    grown_knn, full_knn = _knn_by_id(run), _knn_by_id(full)
    assert grown_knn.keys() == full_knn.keys()
    hits = [len(set(grown_knn[i][0]) & set(nb)) for i, (nb, _) in full_knn.items()]
    assert np.sum(hits) / (5 * len(hits)) >= 0.95


def test_add_from_and_to_object_storage(ray_local, halves, s3_server, s3_bucket):
    """Images, run directory and index all on a real S3 server: the add's reads, part writes,
    index rewrite and run.json go through the store."""
    from semclust.index.search import SearchIndex
    from tests.s3server import upload_folder

    client = s3_server.client()
    assert upload_folder(client, s3_bucket, halves / "first", "images/first") == 36
    assert upload_folder(client, s3_bucket, halves / "second", "images/second") == 39
    run = f"s3://{s3_bucket}/run"
    first, second = f"s3://{s3_bucket}/images/first/", f"s3://{s3_bucket}/images/second/"
    assert main(["run", first, "--run-dir", run, *COMMON]) == 0
    assert main(["add", second, "--run-dir", run, "--no-report"]) == 0
    info = storage.read_json(f"{run}/run.json")
    record = info["stages"]["add"]
    assert record["rows_added"] == 36 and record["embed"]["failed"] == 3
    assert record["graph"]["rows_added"] == 36 and record["index"]["count"] == 72
    assert len(storage.list_shards(f"{run}/knn")) == len(storage.list_shards(f"{run}/embeddings"))
    index = SearchIndex(run)
    assert index.index.ntotal == 72
    hits = index.search_images(
        [f"{second}coffee/{sorted((halves / 'second' / 'coffee').iterdir())[0].name}"], 1
    )
    assert hits[0][0].uri.startswith(f"{second}coffee/") and hits[0][0].similarity > 0.999
