"""Labelling from reference images, on real photos embedded with the real backbone."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from semclust.config import LabelConfig
from semclust.label.refs import class_thresholds, list_references, reference_similarity
from tests.label.conftest import REF_CLASSES, UNRELATED
from tests.label.runs import run_label

pytestmark = pytest.mark.slow


def _labels(run) -> dict[int, tuple[str, float, str]]:
    table = pq.read_table(run / "labels").to_pydict()
    return {
        i: (lab, conf, src)
        for i, lab, conf, src in zip(
            table["image_id"], table["label"], table["confidence"], table["source"], strict=True
        )
    }


def test_reference_images_label_known_classes_and_leave_the_rest_unknown(photo_run, refs_dir):
    run, classes, ids = photo_run
    record = run_label(str(run), LabelConfig(refs=str(refs_dir)))
    labels = _labels(run)
    assert set(labels) == set(ids.tolist())  # every image gets a row
    known = [
        labels[i][0] == c for i, c in zip(ids.tolist(), classes, strict=True) if c in REF_CLASSES
    ]
    unrelated = [labels[i][0] for i, c in zip(ids.tolist(), classes, strict=True) if c in UNRELATED]
    assert np.mean(known) >= 0.9, record["classes"]
    assert np.mean([lab == "unknown" for lab in unrelated]) >= 0.75, unrelated
    assert all(0 <= conf <= 1 and src == "refs" for _, conf, src in labels.values())
    # run.json: the class summary and each cluster's label.
    info = json.loads((run / "run.json").read_text())["stages"]["label"]
    assert info["mode"] == "refs" and info["status"] == "done"
    assert info["reference_images"] == {c: 3 for c in REF_CLASSES}
    assert sum(v["count"] for v in info["classes"].values()) == len(ids)
    cluster_labels = {v["label"] for v in info["clusters"].values()}
    assert cluster_labels <= {*REF_CLASSES, "unknown"} and "unknown" in cluster_labels
    schema = pq.read_schema(next((run / "labels").iterdir()))
    assert [(f.name, str(f.type)) for f in schema] == [
        ("image_id", "int64"),
        ("label", "string"),
        ("confidence", "float"),
        ("source", "string"),
    ]


def test_min_confidence_turns_split_votes_unknown(photo_run, refs_dir):
    run, _, _ = photo_run
    run_label(str(run), LabelConfig(refs=str(refs_dir), min_confidence=0.999))
    labels = _labels(run)
    assert all(lab == "unknown" for lab, conf, _ in labels.values() if conf < 0.999)


def test_thresholds_sit_between_background_and_the_references():
    emb = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.8, 0.2]], dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ref_sim = reference_similarity(emb, np.array([0, 0, 1, 1]), 2)
    assert (ref_sim > 0.95).all()
    thresholds = class_thresholds(ref_sim, np.array([0.2, 0.4]), 0.5, None)
    np.testing.assert_allclose(thresholds, 0.5 * (ref_sim + np.array([0.2, 0.4])))
    np.testing.assert_allclose(class_thresholds(ref_sim, np.zeros(2), 0.5, 0.3), [0.3, 0.3])
    with pytest.raises(ValueError, match="single image"):
        class_thresholds(np.array([np.nan, np.nan]), np.zeros(2), 0.5, None)


def test_a_reference_folder_needs_class_sub_folders(tmp_path, refs_dir):
    assert sorted(list_references(str(refs_dir))) == sorted(REF_CLASSES)
    (tmp_path / "loose.jpg").write_bytes((refs_dir / "coffee" / "ref-0.jpg").read_bytes())
    with pytest.raises(ValueError, match="put each class's images in a sub-folder"):
        list_references(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        list_references(str(tmp_path / "missing"))
