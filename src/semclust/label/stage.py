"""The label stage: ``labels/part-NNNNN.parquet`` from reference images, seed labels or names.

Exactly one of ``refs`` (reference images) and ``seed_labels`` (a labelled subset) may be
given, and ``names`` (cluster id -> name) may be added to either or used alone: images of a
named cluster then take its name, whatever the other mode said. Every labels shard has the
part number of its embeddings shard; ``image_id`` int64, ``label`` string (``unknown`` when no
class fits), ``confidence`` float32 in [0, 1], ``source`` string (``refs``, ``seed``, ``head``,
``propagation``, ``blend``, ``names``). run.json gets a ``label`` record with the class summary
(rows and mean confidence per label) and each mode's details.

The stage contract (``semclust.stage``): ``settings``, ``run``, ``summary``, plus ``details``,
the lines the CLI prints under the summary.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import numpy as np

from semclust import storage
from semclust.config import LabelConfig
from semclust.context import RunContext
from semclust.errors import UserError
from semclust.label.common import LabelWriter
from semclust.rundir.embeddings import RunRows, read_clusters
from semclust.rundir.layout import LABELS, assignments_of

log = logging.getLogger(__name__)

_AUTO_ORDER = ("scan", "dec", "kmeans")  # assignments=auto: refined clusters first


def assignments_folder(run_dir: str, which: str) -> str | None:
    """The assignments folder the labels refer to (``label.assignments``), None when absent."""
    methods = _AUTO_ORDER if which == "auto" else (which,)
    for method in methods:
        folder = assignments_of(method)
        if storage.list_shards(storage.join(run_dir, folder)):
            return folder
    return None


def settings(ctx: RunContext) -> dict[str, Any]:
    """The label section; stops on a missing mode, input file or assignments folder."""
    lc = ctx.cfg.label
    # Checked here, not in LabelConfig: as a section of the run config it is empty by default.
    if lc.refs is None and lc.seed_labels is None and lc.names is None:
        raise UserError("label needs --refs, --seed-labels or --names (or names with one)")
    for what, uri in (
        ("reference folder", lc.refs),
        ("seed labels file", lc.seed_labels),
        ("names file", lc.names),
    ):
        if uri is not None and not storage.exists(uri):
            raise UserError(f"{what} {uri!r} does not exist")
    folder = assignments_folder(ctx.run_dir, lc.assignments)
    if folder is None and (lc.names is not None or lc.assignments != "kmeans"):
        raise UserError(
            f"{ctx.run_dir!r} has no {lc.assignments} assignments: run `semclust cluster` (or "
            "`semclust refine`) first"
        )
    return asdict(lc)


def run(ctx: RunContext) -> dict[str, Any]:
    """Label the run's images in one Ray task: writes labels/; returns the record (mode,
    classes, details). In a task, not the driver: the head's predictions and label
    propagation's (rows, classes) arrays take gigabytes at millions of rows, and the driver is
    often a small head pod."""
    from semclust.index.faiss_ops import node_resources

    ray = ctx.start_ray()
    cpus, _ = node_resources()
    ctx.ensure_held()
    task = ctx.remote(label_task, num_cpus=float(max(1.0, cpus)))
    return dict(ray.get(task.remote(ctx.run_dir, ctx.cfg.label)))


def label_task(run_dir: str, lc: LabelConfig) -> dict[str, Any]:
    """The label stage's work (see ``run``)."""
    from semclust.label import names as names_mode
    from semclust.label.refs import label_with_references
    from semclust.label.seeds import label_with_seeds

    rows = RunRows.load(run_dir)
    folder = assignments_folder(run_dir, lc.assignments)
    clusters = read_clusters(run_dir, folder, rows) if folder else None
    record: dict[str, Any] = {"assignments": folder}
    if lc.refs is not None:
        record.update(label_with_references(run_dir, lc, clusters, rows))
    elif lc.seed_labels is not None:
        record.update(label_with_seeds(run_dir, lc, rows))
    if lc.names is not None:
        assert clusters is not None  # settings() refused names without assignments
        named = names_mode.read_names(lc.names, int(clusters.max()) + 1)
        record["names"] = names_mode.summary(named, clusters)
        record["classes"] = _apply_names(run_dir, rows, clusters, named, fresh="mode" not in record)
        record.setdefault("mode", "names")
        if record["mode"] != "names":
            record["mode"] += "+names"
    return record


def summary(record: dict[str, Any]) -> str:
    return f"label ({record['mode']}): {record.get('rows', '-')} rows"


def details(record: dict[str, Any]) -> list[str]:
    """The cross-validated accuracy (seed labels) and the class table, for the terminal (which
    indents each line under the summary)."""
    lines = []
    if "cross_validation" in record:
        cv = record["cross_validation"]["accuracy"]
        lines.append(f"cross-validated accuracy: {cv} -> {record['method']}")
    lines.append(f"{'label':<24} {'count':>8} {'mean conf':>9}")
    for label, info in record["classes"].items():
        lines.append(f"{label:<24} {info['count']:>8} {info['mean_confidence']:>9.3f}")
    return lines


def _apply_names(
    run_dir: str, rows: RunRows, clusters: np.ndarray, named: dict[int, str], fresh: bool
) -> dict[str, dict[str, Any]]:
    """Write (``fresh``) or overwrite labels of images in named clusters; the class summary."""
    from semclust.label.names import name_clusters

    previous = {}
    if not fresh:
        for uri in storage.list_shards(storage.join(run_dir, LABELS)):
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
