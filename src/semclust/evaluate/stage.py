"""The evaluate stage under the stage contract: metrics.json from every clustering of the run."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from semclust.context import RunContext
from semclust.evaluate.metrics import available_assignments, evaluate_run, headline


def settings(ctx: RunContext) -> dict[str, Any]:
    from semclust.errors import UserError

    if "kmeans" not in available_assignments(ctx.run_dir):
        raise UserError(f"no assignments in {ctx.run_dir!r}: run `semclust cluster` first")
    return {"evaluate": asdict(ctx.cfg.evaluate)}


def run(ctx: RunContext) -> dict[str, Any]:
    ec = ctx.cfg.evaluate
    truth = None if str(ec.truth).lower() == "none" else ec.truth
    metrics = evaluate_run(
        ctx.run_dir,
        truth,
        silhouette_sample=ec.silhouette_sample,
        stability_seeds=ec.stability_seeds,
        retrieval_queries=ec.retrieval_queries,
        seed=ec.seed,
    )
    # run.json keeps the headline; metrics.json has everything (per class, per source).
    return {"truth": truth, "rows": metrics["rows"], "headline": headline(metrics)}


def summary(record: dict[str, Any]) -> str:
    scores = record["headline"].get("kmeans")
    rows = record["rows"]["embedded"]
    if scores:
        return (
            f"{rows} rows, k-means ACC {scores['acc']:.3f} NMI {scores['nmi']:.3f} "
            f"ARI {scores['ari']:.3f} -> metrics.json"
        )
    return f"{rows} rows, label-free scores only -> metrics.json"


def details(record: dict[str, Any]) -> list[str]:
    """The headline scores as JSON, as ``semclust evaluate`` has always printed them."""
    return json.dumps(record["headline"], indent=2).splitlines()
