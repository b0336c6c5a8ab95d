"""Reading a run's per-image verdicts: ``labels/`` (the label stage) and ``failures/`` (images
the embed stage could not use). Schemas in ``schemas``, folder names in ``layout``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from semclust import storage
from semclust.rundir.frames import frame_label
from semclust.rundir.layout import FAILURES, LABELS

LABEL_COLUMNS = ("image_id", "label", "confidence", "source")


def read_labels(run_dir: str, columns: Sequence[str] = LABEL_COLUMNS) -> pa.Table | None:
    """Every ``labels/`` row that has a label (``columns`` of ``schemas.LABELS``), in part
    order; None when the run has no ``labels/``."""
    uris = storage.list_shards(storage.join(run_dir, LABELS))
    if not uris:
        return None
    table = pa.concat_tables([storage.read_parquet(u, list(columns)) for u in uris])
    if "label" in table.column_names:
        table = table.filter(pc.is_valid(table.column("label")))
    return table


@dataclass(frozen=True)
class FailureSummary:
    """The images the embed stage could not use: every one counted, the first few listed."""

    total: int
    by_stage: list[tuple[str, int]]  # (stage, images), most first
    top_reasons: list[tuple[str, str, int]]  # (stage, error, images), most frequent first
    rows: list[tuple[str, str, str]]  # (uri, stage, error): the first ``limit`` by URI


def read_failures(run_dir: str, limit: int, top: int = 20) -> FailureSummary:
    """Counts of ``failures/`` by stage and by reason, and its first ``limit`` rows by URI.

    Read part by part: memory is one part plus the counts and the ``limit`` rows kept.
    """
    by_stage: Counter[str] = Counter()
    reasons: Counter[tuple[str, str]] = Counter()
    first: list[tuple[str, str, str]] = []
    total = 0
    for uri in storage.list_shards(storage.join(run_dir, FAILURES)):
        table = storage.read_parquet(uri)  # uri, stage, error (+ frame_time since videos)
        total += table.num_rows
        for row in table.group_by(["stage", "error"]).aggregate([("uri", "count")]).to_pylist():
            stage, error = row["stage"] or "", row["error"] or ""
            by_stage[stage] += row["uri_count"]
            reasons[stage, error] += row["uri_count"]
        order = pc.sort_indices(table, [("uri", "ascending")])[:limit]
        rows = table.take(order).to_pylist()
        first += [
            (frame_label(r["uri"] or "", r.get("frame_time")), r["stage"] or "", r["error"] or "")
            for r in rows
        ]
        first = sorted(first)[:limit]
    ranked = sorted(reasons.items(), key=lambda r: (-r[1], r[0]))
    return FailureSummary(
        total=total,
        by_stage=sorted(by_stage.items(), key=lambda s: (-s[1], s[0])),
        top_reasons=[(stage, error, n) for (stage, error), n in ranked[:top]],
        rows=first,
    )
