"""Cluster names from a YAML file, alone or over another mode's labels."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from semclust.config import LabelConfig
from semclust.label.names import read_names
from tests.clustering.synthetic import planted
from tests.label.runs import make_run, run_label


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    x, _, _ = planted(300, 3, 8, noise=0.3, seed=2)
    run = tmp_path_factory.mktemp("names") / "run"
    make_run(run, x, 3, rows_per_part=120, knn_k=5)
    return run


def _clusters(run) -> dict[int, int]:
    table = pq.read_table(run / "assignments").to_pydict()
    return dict(zip(table["image_id"], table["cluster"], strict=True))


def test_named_clusters_label_their_images(run_dir, tmp_path):
    names = tmp_path / "names.yaml"
    names.write_text("0: cats\n2: 'dogs'\n")
    record = run_label(str(run_dir), LabelConfig(names=str(names)))
    table = pq.read_table(run_dir / "labels").to_pydict()
    clusters = _clusters(run_dir)
    got = dict(zip(table["image_id"], table["label"], strict=True))
    expected = {i: {0: "cats", 2: "dogs"}[c] for i, c in clusters.items() if c in (0, 2)}
    assert got == expected  # cluster 1 is unnamed: its images get no row
    assert set(table["source"]) == {"names"} and set(table["confidence"]) == {1.0}
    assert record["mode"] == "names"
    assert record["classes"]["cats"]["count"] == sum(c == 0 for c in clusters.values())
    assert len(list((run_dir / "labels").iterdir())) == 3  # one shard per embeddings shard


def test_names_override_seed_labels(run_dir, tmp_path):
    clusters = _clusters(run_dir)
    ids = sorted(clusters)
    seeds = tmp_path / "seeds.csv"
    rows = [i for i in ids if clusters[i] != 1][:40] + [i for i in ids if clusters[i] == 1][:20]
    uris = {
        i: u
        for shard in sorted((run_dir / "embeddings").iterdir())
        for i, u in zip(
            *pq.read_table(shard, columns=["image_id", "uri"]).to_pydict().values(), strict=True
        )
    }
    seeds.write_text(
        "uri,label\n"
        + "".join(f"{uris[i]},{'one' if clusters[i] == 1 else 'other'}\n" for i in rows)
    )
    names = tmp_path / "names.yaml"
    names.write_text("1: named-one\n")
    record = run_label(
        str(run_dir), LabelConfig(seed_labels=str(seeds), names=str(names), head_epochs=20)
    )
    table = pq.read_table(run_dir / "labels").to_pydict()
    assert len(table["image_id"]) == len(ids)  # seed mode labels every image
    for i, label, source in zip(table["image_id"], table["label"], table["source"], strict=True):
        if clusters[i] == 1:
            assert (label, source) == ("named-one", "names")
        else:
            assert label != "named-one" and source != "names"
    assert record["mode"] == "seed_labels+names"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "must be a YAML mapping"),
        ("x: cats\n", "is not an integer"),
        ("7: cats\n", "not one of the run's clusters 0..2"),
        ("0: ''\n", "needs a non-empty name"),
        ("0: unknown\n", "is reserved"),
        ("0: [a\n", "not valid YAML"),
    ],
)
def test_bad_names_files(tmp_path, text, message):
    path = tmp_path / "names.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_names(str(path), 3)
    assert np.isfinite(3)


def test_label_command_prints_the_class_summary(run_dir, tmp_path, capsys):
    from semclust.cli import main

    names = tmp_path / "names.yaml"
    names.write_text("1: bikes\n")
    assert main(["label", "--run-dir", str(run_dir), "--names", str(names)]) == 0
    out = capsys.readouterr().out
    assert "label (names)" in out and "bikes" in out
    assert main(["label", "--run-dir", str(run_dir)]) == 2
    assert "label needs --refs, --seed-labels or --names" in capsys.readouterr().err
