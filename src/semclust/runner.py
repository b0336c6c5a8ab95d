"""Runs stages in order; each stage reads the previous stage's files, not its memory.

Every command that changes a run directory goes through ``holding_run_dir``: the directory is
checked, its lock taken (one run at a time), and whatever stops the command — an error, Ctrl-C,
SIGTERM — leaves each stage that was ``running`` as ``failed`` or ``interrupted`` in run.json,
with the error, before the lock is released.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from semclust import runinfo, storage
from semclust.config import RunConfig
from semclust.context import Held, RunContext
from semclust.errors import UserError
from semclust.stage import run_stage

log = logging.getLogger(__name__)


def check_run_dir(run_dir: str) -> None:
    """Stop at once, with what to fix, when ``run_dir`` cannot be a run directory."""
    if not run_dir:
        raise UserError("no run directory given: pass --run-dir (a local path or s3:// prefix)")
    if storage.is_remote(run_dir):
        storage.check_access(run_dir, must_exist=False)
        return
    fs, path = storage.resolve(run_dir)
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise UserError(f"run directory {run_dir!r} is a file: pass a folder (new or a run's)")
    parent = path
    while fs.get_file_info(parent).type == pafs.FileType.NotFound and "/" in parent.strip("/"):
        parent = parent.rsplit("/", 1)[0] or "/"
    if fs.get_file_info(parent).type == pafs.FileType.File:
        raise UserError(f"run directory {run_dir!r} is inside a file ({parent}): pass a folder")


@contextmanager
def holding_run_dir(run_dir: str, command: str, *, must_exist: bool = False) -> Iterator[Any]:
    """Hold ``run_dir`` for the block: checked, locked, and every stop recorded in run.json.

    ``must_exist``: the command reads an earlier stage's output, so a missing run directory is
    the user's mistake (and is not created by taking the lock).
    """
    from semclust.lock import RunDirLock

    check_run_dir(run_dir)
    if must_exist and not storage.exists(run_dir):
        raise UserError(
            f"run directory {run_dir!r} does not exist, so there are no embeddings under it: "
            "run `semclust embed` (or `semclust run`) first"
        )
    if run_dir.startswith(("gs://", "gcs://")):
        log.warning("gs:// run directories are not locked: run one semclust at a time on them")
        lock: Any = _Unlocked()
    else:
        lock = RunDirLock(run_dir, command=command)
    lock.acquire()
    try:
        yield lock
    except BaseException as exc:
        runinfo.mark_stopped(run_dir, exc)
        raise
    finally:
        lock.release()


class _Unlocked:
    """The lock's interface where the store offers no lock (gs://)."""

    def acquire(self) -> None: ...
    def ensure_held(self) -> None: ...
    def release(self) -> None: ...


def run_stages(
    cfg: RunConfig, names: Sequence[str], command: str = "semclust", lock: Held | None = None
) -> dict[str, dict[str, Any]]:
    """Run the stages ``names`` in order on ``cfg.run_dir``, each under the stage contract
    (``stage.run_stage``); each stage's run.json record.

    Under ``lock`` when the caller holds the run directory already, else under its own hold;
    ``cfg.storage`` applies to every storage call, on the driver and in every worker.
    """
    from semclust import stages

    chosen = [stages.by_name(name) for name in names]
    if lock is None:
        with storage.using(cfg.storage):
            creates = any(stage.creates_run_dir for stage in chosen)
            with holding_run_dir(cfg.run_dir or "", command, must_exist=not creates) as held:
                return run_stages(cfg, names, command, held)
    records: dict[str, dict[str, Any]] = {}
    for stage in chosen:
        ctx = RunContext(_for_variant(cfg, stage), command=command, lock=lock)
        records[stage.name] = run_stage(stage, ctx, stages.dependents(stage.name))
    return records


def _for_variant(cfg: RunConfig, stage: Any) -> RunConfig:
    """``cfg`` with the stage's variant as its section's method: ``refine_dec`` trains DEC
    whatever ``refine.method`` says, so one call can run both heads."""
    if stage.variant is None or getattr(cfg, stage.section).method == stage.variant:
        return cfg
    from semclust.config import replace

    return replace(cfg, **{f"{stage.section}.method": stage.variant})


def run(
    config: RunConfig | str | None = None,
    stages: Sequence[str] | None = None,
    **overrides: Any,
) -> dict[str, dict[str, Any]]:
    """Run semclust from Python: ``config`` a ``RunConfig``, a YAML path or None (defaults),
    ``overrides`` dotted config keys with ``__`` for the dot (``cluster__k=20``) or top-level
    ones (``run_dir=...``); ``stages`` default to those of ``semclust run``. Each stage's record.
    """
    from semclust import stages as registry
    from semclust.config import load_config, replace

    dotted = {key.replace("__", "."): value for key, value in overrides.items()}
    if isinstance(config, RunConfig):
        cfg = replace(config, **dotted) if dotted else config
    else:
        cfg = load_config(config, dotted)
    names = list(stages) if stages is not None else list(registry.RUN)
    return run_stages(cfg, names, command="semclust.run")
