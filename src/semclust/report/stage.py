"""The report stage under the stage contract (``semclust.stage``); the work is ``build``."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from semclust import runinfo
from semclust.context import RunContext
from semclust.report.build import build_report, check_inputs


def settings(ctx: RunContext) -> dict[str, Any]:
    """The ``report`` section; stops when the run has no k-means clusters to show yet."""
    check_inputs(ctx.run_dir)
    return asdict(ctx.cfg.report)


def run(ctx: RunContext) -> dict[str, Any]:
    """Write the report; the record has its ``uri``, counts and part timings."""
    with runinfo.timed("report: connecting to Ray") as t:
        ctx.start_ray()
    record = build_report(ctx.run_dir, ctx.cfg.report, remote=ctx.remote)
    record["timings"] = {"ray": t["seconds"], **record["timings"]}
    return record


def summary(record: dict[str, Any]) -> str:
    return f"{record['clusters']} clusters on {record['pages']} page(s) -> {record['uri']}"
