"""``semclust compare``: several runs over the same images, side by side.

Each run (another backbone, PCA setting, k or head) is read from its ``metrics.json`` (made by
``semclust evaluate``; computed here when missing or when asked to), and every clustering in it
(k-means and each refined head) becomes one row of a table: the truth scores (ACC, NMI, ARI,
purity), the label-free ones (silhouette, size balance, k-means seed stability and kNN
agreement), retrieval and kNN-graph purity, and the labels' accuracy. Runs must hold the same
images (the same set of image ids); otherwise the comparison would not be fair, and it stops.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from semclust import runinfo, storage
from semclust.evaluate import HEADS
from semclust.rundir import layout

log = logging.getLogger(__name__)

# (column, header, how to read it from (metrics, clustering name))
COLUMNS: tuple[tuple[str, str], ...] = (
    ("run", "run"),
    ("backbone", "backbone"),
    ("pca_dim", "PCA"),
    ("k", "k"),
    ("clustering", "clustering"),
    ("acc", "ACC"),
    ("nmi", "NMI"),
    ("ari", "ARI"),
    ("purity", "purity"),
    ("silhouette", "silhouette"),
    ("balance", "balance"),
    ("stability_ari", "seed ARI"),
    ("knn_agreement", "kNN agree"),
    ("knn_purity", "kNN purity"),
    ("top1", "top-1"),
    ("top5", "top-5"),
    ("top10", "top-10"),
    ("label_accuracy", "label acc"),
)


def image_set_fingerprint(run_dir: str) -> str:
    """A hash of the sorted image ids of a run's embeddings (same images = same hash)."""

    shards = storage.list_shards(storage.join(run_dir, layout.EMBEDDINGS))
    if not shards:
        raise ValueError(f"no embeddings in {run_dir!r}")
    ids = np.sort(
        np.concatenate(
            [storage.read_parquet(u, ["image_id"])["image_id"].to_numpy() for u in shards]
        )
    )
    return hashlib.blake2b(ids.tobytes(), digest_size=8).hexdigest()


def run_rows(
    run_dir: str, metrics: dict[str, Any], name: str | None = None
) -> list[dict[str, Any]]:
    """The table rows (one per clustering) of one run's metrics."""
    info = runinfo.load(run_dir)
    stages = info.get("stages", {})
    embedder = stages.get("embed", {}).get("embedder", {})
    cluster = stages.get("cluster", {})
    label_free = metrics.get("label_free", {})
    retrieval = metrics.get("retrieval") or {}
    labels = metrics.get("labels") or {}
    rows = []
    for clustering in ("kmeans", *HEADS):
        scores = metrics.get(clustering)
        free = label_free.get(clustering)
        if scores is None and free is None:
            continue
        scores = scores or {}
        free = free or {}
        rows.append(
            {
                "run": name or run_dir.rstrip("/").rsplit("/", 1)[-1],
                "run_dir": run_dir,
                "backbone": embedder.get("backbone"),
                "pca_dim": cluster.get("pca_dim"),
                "k": cluster.get("k")
                if clustering == "kmeans"
                else stages.get(f"refine_{clustering}", {}).get("k", cluster.get("k")),
                "clustering": clustering,
                "acc": scores.get("acc"),
                "nmi": scores.get("nmi"),
                "ari": scores.get("ari"),
                "purity": scores.get("purity"),
                "silhouette": free.get("silhouette"),
                "balance": (free.get("balance") or {}).get("normalized_entropy"),
                "stability_ari": (label_free.get("stability") or {}).get("mean_pairwise_ari"),
                "knn_agreement": (label_free.get("stability") or {}).get("mean_knn_agreement"),
                "knn_purity": (metrics.get("knn_graph") or {}).get("purity"),
                "top1": retrieval.get("top1"),
                "top5": retrieval.get("top5"),
                "top10": retrieval.get("top10"),
                "label_accuracy": labels.get("accuracy_all_rows"),
            }
        )
    return rows


def compare_runs(
    run_dirs: list[str],
    truth: str | None = None,
    *,
    evaluate: bool = False,
    allow_different_images: bool = False,
) -> dict[str, Any]:
    """Rows of metrics for each run and clustering; ``{"rows": [...], "images": fingerprint}``.

    A run without ``metrics.json`` is evaluated first (with ``truth``); ``evaluate=True``
    re-evaluates every run, so that all rows come from the same truth and sample sizes.
    """
    if len(run_dirs) < 1:
        raise ValueError("compare needs at least one run directory")
    fingerprints = {run: image_set_fingerprint(run) for run in run_dirs}
    if len(set(fingerprints.values())) > 1 and not allow_different_images:
        detail = ", ".join(f"{r}: {f}" for r, f in fingerprints.items())
        raise ValueError(
            f"the runs hold different images ({detail}); compare runs of the same images, or "
            "pass --allow-different-images"
        )
    names = _short_names(run_dirs)
    rows: list[dict[str, Any]] = []
    for run, name in zip(run_dirs, names, strict=True):
        uri = storage.join(run, layout.METRICS)
        if evaluate or not storage.exists(uri):
            log.info("compare: evaluating %s", run)
            metrics = _evaluate(run, truth)
        else:
            metrics = storage.read_json(uri)
            if truth is not None and metrics.get("truth") != truth:
                log.warning(
                    "compare: %s was evaluated with truth %r, not %r",
                    run,
                    metrics.get("truth"),
                    truth,
                )
        rows.extend(run_rows(run, metrics, name))
    return {"images": sorted(set(fingerprints.values())), "rows": rows}


def _short_names(run_dirs: list[str]) -> list[str]:
    """The last path component of each run, made unique with the one before where needed."""
    last = [r.rstrip("/").rsplit("/", 1)[-1] for r in run_dirs]
    if len(set(last)) == len(last):
        return last
    return ["/".join(r.rstrip("/").rsplit("/", 2)[-2:]) for r in run_dirs]


def format_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]] = COLUMNS) -> str:
    """A Markdown table of the rows, ``columns`` as (key, header); empty columns (no row has
    them) are left out."""
    cols = [(key, head) for key, head in columns if any(r.get(key) is not None for r in rows)]

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value)

    lines = [
        "| " + " | ".join(head for _, head in cols) + " |",
        "| " + " | ".join("---" for _ in cols) + " |",
    ]
    lines += ["| " + " | ".join(cell(r.get(key)) for key, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------------


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``semclust compare`` (it takes run directories, not --run-dir)."""
    parser.add_argument("run_dirs", nargs="+", help="run directories (local paths or s3://)")
    parser.add_argument(
        "--truth",
        help="evaluate runs that have no metrics.json with this truth (folder-names or a file)",
    )
    parser.add_argument(
        "--evaluate", action="store_true", help="re-evaluate every run before comparing"
    )
    parser.add_argument("--allow-different-images", action="store_true")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--out", help="also write the JSON to this file or URI")


def run_compare_command(args: argparse.Namespace) -> int:
    """``semclust compare``: prints a Markdown table (or JSON) of every run's metrics."""
    result = compare_runs(
        list(args.run_dirs),
        args.truth,
        evaluate=args.evaluate,
        allow_different_images=args.allow_different_images,
    )
    if args.out:
        storage.write_json(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result["rows"]))
    return 0


def _evaluate(run_dir: str, truth: str | None) -> dict[str, Any]:
    """The evaluate stage on one run, under the stage contract (locked, recorded in run.json)."""
    from semclust.config import load_config
    from semclust.runner import run_stages

    overrides = {"run_dir": run_dir, "evaluate.truth": truth or "none"}
    run_stages(load_config(None, overrides), ["evaluate"], command="semclust compare")
    return dict(storage.read_json(storage.join(run_dir, layout.METRICS)))
