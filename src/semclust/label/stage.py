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

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from semclust import runinfo, storage
from semclust.config import parse_bytes
from semclust.label.common import LABELS_DIR, LabelWriter, RunRows
from semclust.label.seeds import SEED_METHODS

log = logging.getLogger(__name__)

STAGE = "label"
LABEL_ASSIGNMENTS = ("kmeans", "scan", "dec", "auto")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


@dataclass(frozen=True)
class LabelConfig:
    """embeddings/ + knn/ + assignments -> labels/."""

    refs: str | None = None  # folder/prefix with one sub-folder of example images per class
    seed_labels: str | None = None  # Parquet/CSV with uri,label for a small labelled subset
    names: str | None = None  # YAML cluster id -> name
    # Which clusters are labelled/named: k-means (assignments/), a head, or auto (the refined
    # SCAN ones if present, then DEC, then k-means).
    assignments: str = "kmeans"
    min_confidence: float = 0.0  # a label with a lower confidence becomes "unknown"
    # refs
    vote_k: int = 10  # graph neighbours in each image's vote
    unknown_threshold: float | None = None  # one cosine for all classes; None: per class, auto
    unknown_position: float = 0.5  # auto threshold: 0 = background level, 1 = the refs' own
    # seed labels
    method: str = "auto"  # auto | head | propagation | blend
    cv_folds: int = 5
    head_epochs: int = 100
    head_hidden: int = 0  # 0 = a linear softmax head
    head_dropout: float = 0.2
    head_weight_decay: float = 1e-2
    propagation_alpha: float = 0.9
    propagation_iterations: int = 20
    max_propagation_memory: str = "4GB"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.refs is not None and self.seed_labels is not None:
            raise ValueError("label takes --refs or --seed-labels, not both")
        _choice("label.assignments", self.assignments, LABEL_ASSIGNMENTS)
        _choice("label.method", self.method, SEED_METHODS)
        if not 0 <= self.min_confidence <= 1:
            raise ValueError(f"label.min_confidence must be in [0, 1], got {self.min_confidence}")
        if self.unknown_threshold is not None and not -1 <= self.unknown_threshold <= 1:
            raise ValueError(
                f"label.unknown_threshold must be a cosine in [-1, 1], got {self.unknown_threshold}"
            )
        if not 0 <= self.unknown_position <= 1:
            raise ValueError(
                f"label.unknown_position must be in [0, 1], got {self.unknown_position}"
            )
        if not 0 < self.propagation_alpha < 1:
            raise ValueError(
                f"label.propagation_alpha must be in (0, 1), got {self.propagation_alpha}"
            )
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"label.head_dropout must be in [0, 1), got {self.head_dropout}")
        for name in ("vote_k", "head_epochs", "propagation_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"label.{name} must be >= 1, got {getattr(self, name)}")
        if self.cv_folds < 2:
            raise ValueError(f"label.cv_folds must be >= 2, got {self.cv_folds}")
        if self.head_hidden < 0 or self.head_weight_decay < 0:
            raise ValueError("label.head_hidden and label.head_weight_decay must be >= 0")
        parse_bytes(self.max_propagation_memory, "label.max_propagation_memory")


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


def _read_clusters(run_dir: str, folder: str, rows: RunRows) -> np.ndarray:
    out = np.full(len(rows), -1, dtype=np.int64)
    for uri in storage.list_shards(storage.join(run_dir, folder)):
        table = storage.read_parquet(uri, ["image_id", "cluster"])
        where = rows.rows_of(table.column("image_id").to_numpy())
        ok = where >= 0
        out[where[ok]] = table.column("cluster").to_numpy()[ok]
    return out


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
    clusters = _read_clusters(run_dir, folder, rows) if folder else None
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


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``semclust label`` (besides the common --run-dir, ...)."""
    d = LabelConfig.__dataclass_fields__
    g = parser.add_argument_group("label options")
    g.add_argument("--refs", help="folder/URI with one sub-folder of example images per class")
    g.add_argument("--seed-labels", help="Parquet/CSV with uri,label for a small labelled subset")
    g.add_argument("--names", help="YAML mapping cluster id -> name")
    g.add_argument(
        "--assignments",
        choices=LABEL_ASSIGNMENTS,
        default=d["assignments"].default,
        help="clusters to label/name: kmeans (default), scan, dec, auto",
    )
    g.add_argument("--min-confidence", type=float, default=d["min_confidence"].default)
    g.add_argument(
        "--unknown-threshold",
        type=float,
        help="refs: cosine under which an image is unknown (default: per class, automatic)",
    )
    g.add_argument("--vote-k", type=int, default=d["vote_k"].default)
    g.add_argument(
        "--label-method",
        dest="label_method",
        choices=SEED_METHODS,
        default=d["method"].default,
        help="seed labels: head, propagation, blend, or auto (best cross-validated)",
    )
    g.add_argument("--cv-folds", type=int, default=d["cv_folds"].default)
    g.add_argument("--label-seed", dest="label_seed", type=int, default=d["seed"].default)


def label_config_from_args(args: argparse.Namespace) -> LabelConfig:
    return LabelConfig(
        refs=args.refs,
        seed_labels=args.seed_labels,
        names=args.names,
        assignments=args.assignments,
        min_confidence=args.min_confidence,
        unknown_threshold=args.unknown_threshold,
        vote_k=args.vote_k,
        method=args.label_method,
        cv_folds=args.cv_folds,
        seed=args.label_seed,
    )


def run_label_command(args: argparse.Namespace) -> int:
    """``semclust label``: prints the class summary; bad input raises ValueError."""
    if not getattr(args, "run_dir", None):
        raise ValueError("no run directory given: pass --run-dir")
    record = run_label(args.run_dir, label_config_from_args(args))
    print(f"label ({record['mode']}): {record.get('rows', '-')} rows, {record['seconds']:.1f} s")
    if "cross_validation" in record:
        cv = record["cross_validation"]["accuracy"]
        print(f"  cross-validated accuracy: {cv} -> {record['method']}")
    print(f"  {'label':<24} {'count':>8} {'mean conf':>9}")
    for label, info in record["classes"].items():
        print(f"  {label:<24} {info['count']:>8} {info['mean_confidence']:>9.3f}")
    return 0
