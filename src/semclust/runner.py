"""Runs stages in order; each stage reads the previous stage's files, not its memory.

Every command that changes a run directory goes through ``holding_run_dir``: the directory is
checked, its lock taken (one run at a time), and whatever stops the command — an error, Ctrl-C,
SIGTERM — leaves each stage that was ``running`` as ``failed`` or ``interrupted`` in run.json,
with the error, before the lock is released.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from semclust import runinfo, storage
from semclust.config import RunConfig
from semclust.errors import UserError

log = logging.getLogger(__name__)

STAGE_ORDER = ("embed", "cluster", "graph", "index")


def stage_function(name: str) -> Callable[[RunConfig], dict[str, Any]]:
    if name == "embed":
        from semclust.embed.pipeline import run_embed

        return run_embed
    if name == "cluster":
        from semclust.clustering.kmeans import run_cluster

        return run_cluster
    if name == "graph":
        from semclust.clustering.knn import run_graph

        return run_graph
    if name == "index":
        from semclust.index.build import run_index

        return run_index
    raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGE_ORDER)}")


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
    cfg: RunConfig, names: Sequence[str], command: str = "semclust", lock: Any = None
) -> dict[str, dict[str, Any]]:
    """Run ``names`` in order on ``cfg.run_dir``; each stage's run.json record.

    Under ``lock`` when the caller holds the run directory already, else under its own hold.
    """
    storage.configure_s3(storage.s3_options_from_config(cfg.storage))
    if lock is None:
        reads_only = "embed" not in names
        with holding_run_dir(cfg.run_dir or "", command, must_exist=reads_only) as held:
            return run_stages(cfg, names, command, held)
    records: dict[str, dict[str, Any]] = {}
    for name in names:
        if name == "embed":  # the stage that commits for long: it checks the lock each time
            from semclust.embed.pipeline import run_embed

            records[name] = run_embed(cfg, ensure_held=lock.ensure_held)
        else:
            lock.ensure_held()
            records[name] = stage_function(name)(cfg)
    return records


def run_all(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """embed -> cluster -> graph -> index; returns each stage's run.json record."""
    return run_stages(cfg, STAGE_ORDER, command="semclust run")
