"""The label stage: ``labels/part-NNNNN.parquet`` from reference images, seed labels or names.

Exactly one of ``refs`` (reference images) and ``seed_labels`` (a labelled subset) may be
given, and ``names`` (cluster id -> name) may be added to either or used alone: images of a
named cluster then take its name, whatever the other mode said. Every labels shard has the
part number of its embeddings shard; ``image_id`` int64, ``label`` string (``unknown`` when no
class fits), ``confidence`` float32 in [0, 1], ``source`` string (``refs``, ``seed``, ``head``,
``propagation``, ``blend``, ``names``). run.json gets a ``label`` record with the class summary
(rows and mean confidence per label) and each mode's details.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from semclust import runinfo, storage
from semclust.clustering.shards import read_clusters
from semclust.config import LabelConfig
from semclust.label.common import LABELS_DIR, LabelWriter, RunRows

log = logging.getLogger(__name__)

STAGE = "label"


def _assignments_folder(run_dir: str, which: str) -> str | None:
    from semclust.clustering.kmeans import ASSIGNMENTS_DIR

    folders = {
        "kmeans": ASSIGNMENTS_DIR,
        "scan": f"{ASSIGNMENTS_DIR}_scan",
        "dec": f"{ASSIGNMENTS_DIR}_dec",
    }
    present = {k: f for k, f in folders.items() if storage.list_shards(storage.join(run_dir, f))}
    if which == "auto":
        return next((present[k] for k in ("scan", "dec", "kmeans") if k in present), None)
    return present.get(which)


def run_label(run_dir: str, lc: LabelConfig) -> dict[str, Any]:
    """Label a run's images; writes labels/ and the run.json ``label`` record, returned."""
    from semclust.label import names as names_mode
    from semclust.label.refs import label_with_references
    from semclust.label.seeds import label_with_seeds

    # Checked here, not in LabelConfig: as a section of the run config it is empty by default.
    if lc.refs is None and lc.seed_labels is None and lc.names is None:
        raise ValueError("label needs --refs, --seed-labels or --names (or names with one)")
    start = time.perf_counter()
    rows = RunRows.load(run_dir)
    folder = _assignments_folder(run_dir, lc.assignments)
    if folder is None and (lc.names is not None or lc.assignments != "kmeans"):
        raise ValueError(
            f"{run_dir!r} has no {lc.assignments} assignments: run `semclust cluster` (or "
            "`semclust refine`) first"
        )
    clusters = read_clusters(run_dir, folder, rows) if folder else None
    runinfo.update_stage(
        run_dir, STAGE, {"status": "running", "settings": asdict(lc)}, {STAGE: asdict(lc)}
    )
    record: dict[str, Any] = {"assignments": folder}
    if lc.refs is not None:
        record.update(label_with_references(run_dir, lc, clusters, rows))
    elif lc.seed_labels is not None:
        record.update(label_with_seeds(run_dir, lc, rows))
    if lc.names is not None:
        assert clusters is not None
        k = int(clusters.max()) + 1
        named = names_mode.read_names(lc.names, k)
        record["names"] = names_mode.summary(named, clusters)
        record["classes"] = _apply_names(run_dir, rows, clusters, named, fresh="mode" not in record)
        record.setdefault("mode", "names")
        if record["mode"] != "names":
            record["mode"] += "+names"
    record.update(status="done", settings=asdict(lc), seconds=round(time.perf_counter() - start, 3))
    runinfo.update_stage(run_dir, STAGE, record, {STAGE: asdict(lc)})
    return record


def _apply_names(
    run_dir: str, rows: RunRows, clusters: np.ndarray, named: dict[int, str], fresh: bool
) -> dict[str, dict[str, Any]]:
    """Write (``fresh``) or overwrite labels of images in named clusters; the class summary."""
    from semclust.label.names import name_clusters

    previous = {}
    if not fresh:
        for uri in storage.list_shards(storage.join(run_dir, LABELS_DIR)):
            previous[uri.rsplit("/", 1)[-1]] = storage.read_parquet(uri)
    writer = LabelWriter(run_dir)
    for uri, span in rows.shards():
        is_named, names = name_clusters(clusters[span], named)
        ids = rows.ids[span]
        labels = names.copy()
        confidence = np.ones(len(ids), dtype=np.float32)
        source = np.full(len(ids), "names", dtype=object)
        keep = is_named
        old = previous.get(uri.rsplit("/", 1)[-1])
        if old is not None:
            # Rows of the earlier mode are in the same order as the shard's embeddings.
            if not np.array_equal(old.column("image_id").to_numpy(), ids):
                raise RuntimeError(f"labels shard of {uri} does not match its embeddings shard")
            labels = np.where(
                is_named, names, np.asarray(old.column("label").to_pylist(), dtype=object)
            )
            confidence = np.where(is_named, 1.0, old.column("confidence").to_numpy()).astype(
                np.float32
            )
            source = np.where(
                is_named, "names", np.asarray(old.column("source").to_pylist(), dtype=object)
            )
            keep = np.ones(len(ids), dtype=bool)
        if keep.any():
            writer.write(uri, ids[keep], labels[keep], confidence[keep], source[keep])
    return writer.summary()


# --- command line --------------------------------------------------------------------------------


def run_label_command(cfg: Any) -> int:
    """``semclust label`` with a RunConfig: prints the class summary."""
    if not cfg.run_dir:
        raise ValueError("no run directory given: pass --run-dir")
    record = run_label(cfg.run_dir, cfg.label)
    print(f"label ({record['mode']}): {record.get('rows', '-')} rows, {record['seconds']:.1f} s")
    if "cross_validation" in record:
        cv = record["cross_validation"]["accuracy"]
        print(f"  cross-validated accuracy: {cv} -> {record['method']}")
    print(f"  {'label':<24} {'count':>8} {'mean conf':>9}")
    for label, info in record["classes"].items():
        print(f"  {label:<24} {info['count']:>8} {info['mean_confidence']:>9.3f}")
    return 0
