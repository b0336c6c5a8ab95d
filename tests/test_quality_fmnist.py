"""The quality path end to end on real images: a seeded Fashion-MNIST subset through the CLI.

`semclust run` (EfficientNet-Lite0, k-means), `semclust refine` (SCAN and DEC), `semclust label
--seed-labels` and `semclust evaluate`, scored against the true classes. Needs Debian's
`dataset-fashion-mnist` (tools/test.sh installs it when run as root); skipped without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.fmnist_data import CLASSES, FMNIST_DIR, load_fashion_mnist

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not FMNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist (Debian)"
    ),
]

PER_CLASS = 50


@pytest.fixture(scope="module")
def fmnist_run(tmp_path_factory, ray_local) -> tuple[Path, Path]:
    from semclust.cli import main

    images, labels = load_fashion_mnist()
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("fmnist")
    folder = root / "images"
    for c, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        for i in rng.choice(np.flatnonzero(labels == c), size=PER_CLASS, replace=False):
            Image.fromarray(images[i]).save(folder / name / f"{i:05d}.png")
    run = root / "run"
    argv = ["run", str(folder), "--run-dir", str(run), "--backbone", "efficientnet_lite0"]
    argv += ["--weights", "default", "--k", "10", "--knn-k", "10", "--nredo", "3"]
    assert main(argv) == 0
    return folder, run


def test_heads_labels_and_scores_on_real_images(fmnist_run, tmp_path, capsys):
    from semclust.cli import main

    _, run = fmnist_run
    refine = ["refine", "--run-dir", str(run), "--epochs", "20", "--batch-size", "128"]
    assert main([*refine, "--method", "scan"]) == 0
    assert main(["refine", "--run-dir", str(run), "--method", "dec"]) == 0

    # 10% of the images labelled, the rest to be labelled by semclust.
    embedded = pq.read_table(run / "embeddings", columns=["uri"])["uri"].to_pylist()
    rng = np.random.default_rng(3)
    seeds = sorted(rng.choice(embedded, size=len(embedded) // 10, replace=False).tolist())
    truth = {u: Path(u).parent.name for u in embedded}
    seed_file = tmp_path / "seeds.parquet"
    pq.write_table(pa.table({"uri": seeds, "label": [truth[u] for u in seeds]}), seed_file)
    capsys.readouterr()
    assert main(["label", "--run-dir", str(run), "--seed-labels", str(seed_file)]) == 0
    assert "cross-validated accuracy" in capsys.readouterr().out

    assert main(["evaluate", "--run-dir", str(run), "--truth", "folder-names"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    n = len(CLASSES) * PER_CLASS
    for name in ("kmeans", "scan", "dec"):
        assert metrics[name]["n"] == n, name
        # Chance is 0.1 ACC / 0 NMI; real ImageNet features separate these classes far better.
        assert metrics[name]["acc"] > 0.45 and metrics[name]["nmi"] > 0.45, (name, metrics[name])
    record = json.loads((run / "run.json").read_text())["stages"]
    assert record["refine_scan"]["status"] == "done" and record["refine_dec"]["status"] == "done"
    assert record["refine_scan"]["loss_curve"] and record["refine_dec"]["loss_curve"]

    # Honest held-out accuracy: the cross-validated estimate predicts the accuracy on the rest.
    label = record["label"]
    estimate = label["cross_validation"]["accuracy"][label["method"]]
    table = pq.read_table(run / "labels").to_pydict()
    uri_of = dict(
        zip(
            pq.read_table(run / "embeddings", columns=["image_id"])["image_id"].to_pylist(),
            embedded,
            strict=True,
        )
    )
    seeded = set(seeds)
    rest = [
        (truth[uri_of[i]], lab)
        for i, lab in zip(table["image_id"], table["label"], strict=True)
        if uri_of[i] not in seeded
    ]
    assert len(rest) == n - len(seeds)
    accuracy = float(np.mean([t == p for t, p in rest]))
    assert accuracy > 0.6, accuracy
    assert abs(accuracy - estimate) < 0.12, (accuracy, estimate)
    assert metrics["labels"]["accuracy"] > 0.6

    capsys.readouterr()
    assert main(["compare", str(run)]) == 0
    table_text = capsys.readouterr().out
    assert "| kmeans |" in table_text and "| scan |" in table_text and "| dec |" in table_text
