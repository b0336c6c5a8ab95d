"""The stage contract: how every stage is declared and run.

A stage is declared once in ``semclust.stages`` (name, command, config section, what it reads
and writes) and implemented by a module with three functions:

- ``settings(ctx) -> dict``: what decides its outputs (its config section, the embeddings'
  fingerprint...), computed before anything changes; bad input raises ``UserError`` here.
- ``run(ctx) -> dict``: the work; returns the run.json record (counts, timings of its parts).
  An error it raises may carry the counts known so far as ``.record``: they are kept in run.json
  with the ``failed`` status.
  ``ctx.previous`` is the record of its last run, ``ctx.resumable`` says whether that run had the
  same settings (so committed outputs may be kept); returning ``ctx.previous`` itself means
  "already done, nothing changed".
- ``summary(record) -> str``: one line for the terminal.

``run_stage`` does the rest, the same for every stage: the storage settings, overwrite of the
stage and its dependents, status ``running`` -> ``done`` / ``failed`` / ``interrupted`` with the
error in run.json, timing, and Ray's wrappers taken off the error that stopped it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from semclust import runinfo, storage
from semclust.context import RunContext
from semclust.errors import remote_cause

log = logging.getLogger(__name__)


class Stage(Protocol):
    name: str  # its key in run.json
    section: str  # its config section
    reads: tuple[str, ...]  # the stages whose outputs it reads
    writes: tuple[str, ...]  # its folders and files in the run directory

    def settings(self, ctx: RunContext) -> dict[str, Any]: ...
    def run(self, ctx: RunContext) -> dict[str, Any]: ...
    def summary(self, record: dict[str, Any]) -> str: ...


@dataclass(frozen=True)
class StageSpec:
    """A stage as ``semclust.stages`` declares it; ``module`` implements it (imported on use, so
    building the CLI stays fast)."""

    name: str
    command: str  # the CLI subcommand (two refine heads share ``refine``)
    section: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    module: str
    help: str
    variant: str | None = None  # the section's ``method`` value selecting this stage of a command
    creates_run_dir: bool = False  # the first stage; every other one needs an existing run

    def implementation(self) -> ModuleType:
        return importlib.import_module(self.module)

    def settings(self, ctx: RunContext) -> dict[str, Any]:
        return dict(self.implementation().settings(ctx))

    def run(self, ctx: RunContext) -> dict[str, Any]:
        # Not copied: run_stage tells "already done" (ctx.previous itself) by identity.
        record: dict[str, Any] = self.implementation().run(ctx)
        return record

    def summary(self, record: dict[str, Any]) -> str:
        return str(self.implementation().summary(record))


def run_stage(stage: Stage, ctx: RunContext, dependents: list[Stage]) -> dict[str, Any]:
    """Run one stage under the contract; its run.json record. ``dependents``: the stages whose
    outputs an overwrite of this one makes stale (``stages.dependents``)."""
    run_dir = ctx.run_dir
    with storage.using(ctx.storage):
        ctx.ensure_held()
        previous = runinfo.load(run_dir).get("stages", {}).get(stage.name, {})
        ctx.previous = previous if isinstance(previous, dict) else {}
        settings = stage.settings(ctx)
        ctx.settings = settings
        if ctx.mode == "overwrite":
            clear_outputs(run_dir, [stage, *dependents])
            ctx.previous = {}
        config = ctx.cfg.to_dict()
        runinfo.update_stage(
            run_dir, stage.name, {"status": "running", "settings": settings}, config, stage.section
        )
        start = time.perf_counter()
        try:
            record = stage.run(ctx)
        except BaseException as exc:
            cause = remote_cause(exc)
            partial = getattr(cause, "record", None)  # counts a stage knew when it stopped
            if isinstance(partial, dict):
                running = {**partial, "status": "running", "settings": settings}
                with contextlib.suppress(Exception):  # the store may be what failed
                    runinfo.update_stage(run_dir, stage.name, running, config, stage.section)
            runinfo.mark_stopped(run_dir, cause)
            if cause is not exc:
                raise cause from exc
            raise
        if record is not ctx.previous or record.get("status") != "done":
            record = {
                **record,
                "status": "done",
                "settings": settings,
                "seconds": round(time.perf_counter() - start, 3),
            }
        runinfo.update_stage(run_dir, stage.name, record, config, stage.section)
        return record


def clear_outputs(run_dir: str, stages: list[Stage]) -> None:
    """Remove every folder and file the ``stages`` write (``--mode overwrite``)."""
    for stage in stages:
        for name in stage.writes:
            storage.remove_tree(storage.join(run_dir, name))
        log.debug("overwrite: cleared %s of %s", ", ".join(stage.writes), stage.name)
