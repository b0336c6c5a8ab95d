"""The embed stage's output: parts committed exactly once by the workers (``PartCommitter``), and
the bookkeeping a resume and the final check read back from the run directory.

A part is a fixed, numbered group of at most ``rows_per_part`` listed URIs (``embed.todo``). Its
failures shard is written before its embeddings shard, and the embeddings shard is the part's
commit marker: a crash in between leaves an orphan failures shard, which ``committed_state``
deletes so that the part is processed again. The stage ends with ``check_counts``: every listed
image is embedded or a failure row, exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from semclust import storage
from semclust.embed.sources import isin_sorted
from semclust.errors import StoreUnavailable
from semclust.rundir import frames, layout, schemas

log = logging.getLogger(__name__)

# ``error_stage`` of a row whose read failed for a transient reason after every retry: it is
# neither embedded nor a failure row, so its part commits without it and the resume reads it again.
DEFERRED = "deferred"


# The commit record each write task returns to the driver: a few numbers per part, no rows.
COMMIT_COLUMNS = ("part", "embedded", "failed", "deferred", "deferred_error")


class PartCommitter:
    """Ray Data write task: commits each whole part of a batch where it runs, and returns one
    small commit record per part (``COMMIT_COLUMNS``), so embeddings never pass through the
    driver.

    A part arrives whole (the pipeline keeps one block per part; ``part_rows`` says how many
    rows it has) and is committed under its own number: its failures shard first, then its
    embeddings shard (the commit marker), each written atomically. A retried or re-executed task
    rewrites the same two files with the same rows, so no row is ever committed twice. Rows whose
    read failed for a transient reason (``DEFERRED``) are left out of both shards; the resume
    numbers them into new parts.

    ``lock_token``: the run's token in ``run.lock``, checked before every commit
    (``lock.ensure_token``), so a run that lost its run directory stops writing there.
    """

    def __init__(self, run_dir: str, dim: int, lock_token: str | None = None) -> None:
        self.run_dir = run_dir
        self.dim = dim
        self.lock_token = lock_token

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = np.asarray(batch["part"], dtype=np.int64)
        expected = np.asarray(batch["part_rows"], dtype=np.int64)
        records: list[tuple[int, int, int, int, str]] = []
        for part in np.unique(parts):
            sel = parts == part
            got, want = int(sel.sum()), int(expected[sel][0])
            if got != want:  # a bug in how blocks are cut, not a user error
                raise RuntimeError(f"part {int(part)} reached the writer as {got} of {want} rows")
            cols = {k: np.asarray(v)[sel] for k, v in batch.items() if k != "pixels"}
            records.append(self._commit(int(part), cols))
        return {
            name: np.asarray([r[i] for r in records], dtype=object if i == 4 else np.int64)
            for i, name in enumerate(COMMIT_COLUMNS)
        }

    def _commit(self, part: int, cols: dict[str, np.ndarray]) -> tuple[int, int, int, int, str]:
        from semclust.lock import ensure_token

        errors = cols["error"].astype(object)
        ok = errors == ""
        deferred = cols["error_stage"].astype(object) == DEFERRED
        failed = ~ok & ~deferred
        name = f"part-{part:05d}.parquet"
        if self.lock_token is not None:
            ensure_token(self.run_dir, self.lock_token)
        if failed.any():
            storage.write_parquet(
                storage.join(self.run_dir, layout.FAILURES, name), _failures(cols, failed)
            )
        storage.write_parquet(
            storage.join(self.run_dir, layout.EMBEDDINGS, name), _embeddings(cols, ok, self.dim)
        )
        last_deferred = str(errors[deferred][-1]) if deferred.any() else ""
        log.info(
            "committed %s: %d embedded, %d failed%s",
            name,
            int(ok.sum()),
            int(failed.sum()),
            f", {int(deferred.sum())} left for the resume (store unreachable)"
            if deferred.any()
            else "",
        )
        return part, int(ok.sum()), int(failed.sum()), int(deferred.sum()), last_deferred


def commit_batch(
    batch: dict[str, np.ndarray], run_dir: str, dim: int, lock_token: str | None
) -> dict[str, np.ndarray]:
    """The write task (a Ray Data map over the model's output): ``PartCommitter`` as a function,
    so Ray Data runs it as plain tasks, not actors."""
    return PartCommitter(run_dir, dim, lock_token)(batch)


def _frames(cols: dict[str, np.ndarray], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(frame_time float32, frame_index int32) of the rows: NaN and -1 for still images."""
    n = int(rows.sum())
    times = cols.get("frame_time")
    index = cols.get("frame_index")
    return (
        np.full(n, np.nan, np.float32) if times is None else times[rows].astype(np.float32),
        np.full(n, -1, np.int32) if index is None else index[rows].astype(np.int32),
    )


def _failures(cols: dict[str, np.ndarray], rows: np.ndarray) -> pa.Table:
    times, _ = _frames(cols, rows)
    return pa.table(
        {
            "uri": pa.array(cols["uri"].astype(object)[rows].tolist(), pa.string()),
            "stage": pa.array(cols["error_stage"][rows].astype(object).tolist(), pa.string()),
            "error": pa.array(cols["error"].astype(object)[rows].tolist(), pa.string()),
            "frame_time": frames.as_nullable(times),
        },
        schema=schemas.FAILURES,
    )


def _embeddings(cols: dict[str, np.ndarray], rows: np.ndarray, dim: int) -> pa.Table:
    emb = np.ascontiguousarray(cols["embedding"][rows], dtype=np.float32).reshape(-1, dim)
    uris = cols["uri"].astype(object)[rows].tolist()
    times, index = _frames(cols, rows)
    return pa.table(
        {
            "image_id": pa.array(frames.row_ids(uris, times.tolist()), pa.int64()),
            "uri": pa.array(uris, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim),
            "width": pa.array(cols["width"][rows].astype(np.int32)),
            "height": pa.array(cols["height"][rows].astype(np.int32)),
            "frame_time": frames.as_nullable(times),
            "frame_index": pa.array(index, pa.int32(), mask=index < 0),
        },
        schema=schemas.embeddings(dim),
    )


# --- run-directory bookkeeping ---------------------------------------------------------------


def _part_number(uri: str) -> int:
    return int(uri.rsplit("part-", 1)[1].split(".", 1)[0])


def _shard_ids(run_dir: str) -> tuple[list[np.ndarray], list[np.ndarray], list[str], set[int]]:
    """Image ids of each committed embeddings shard and failures shard (orphans left out)."""
    emb_shards = storage.list_shards(storage.join(run_dir, layout.EMBEDDINGS))
    committed_parts = {_part_number(u) for u in emb_shards}
    emb_ids = [
        storage.read_parquet(u, ["image_id"])["image_id"].to_numpy().astype(np.int64)
        for u in emb_shards
    ]
    fail_ids: list[np.ndarray] = []
    orphans: list[str] = []
    for uri in storage.list_shards(storage.join(run_dir, layout.FAILURES)):
        if _part_number(uri) not in committed_parts:
            orphans.append(uri)
            continue
        fail_ids.append(frames.table_row_ids(_read_failure_keys(uri)))
    return emb_ids, fail_ids, orphans, committed_parts


def _read_failure_keys(uri: str) -> pa.Table:
    """A failures shard's ``uri`` and, when it has one (shards from before videos had none),
    ``frame_time``: what a failure row's image id is made of."""
    return storage.read_parquet(uri)  # small (failed rows only), so whole: one request


def committed_state(run_dir: str) -> tuple[np.ndarray, int]:
    """(sorted unique ids already committed, next free part number) of a run directory.

    Orphan failures shards (whose part has no embeddings shard) are deleted: their part did not
    commit and its URIs will be processed again.
    """
    emb_ids, fail_ids, orphans, committed_parts = _shard_ids(run_dir)
    for uri in orphans:
        log.warning("removing orphan failures shard %s (its part never committed)", uri)
        storage.remove_tree(uri)
    done = np.unique(np.concatenate([np.empty(0, np.int64), *emb_ids, *fail_ids]))
    return done, max(committed_parts, default=-1) + 1


def count_outputs(run_dir: str, listed_ids: np.ndarray | Iterable[int]) -> dict[str, int]:
    """Counts over committed shards, checking that no image id appears twice.

    ``listed_ids``: the ids of the listing (a numpy array, sorted or not, or any iterable of
    ints); everything is done on int64 arrays, 8 bytes per row.
    """
    if not isinstance(listed_ids, np.ndarray):
        listed_ids = np.fromiter(listed_ids, dtype=np.int64)
    listed = np.unique(np.asarray(listed_ids, dtype=np.int64))
    emb_ids, fail_ids, _, _ = _shard_ids(run_dir)
    emb = np.concatenate([np.empty(0, np.int64), *emb_ids])
    fail = np.concatenate([np.empty(0, np.int64), *fail_ids])
    everything = np.sort(np.concatenate([emb, fail]))
    duplicates = int((everything[1:] == everything[:-1]).sum())
    embedded = int(isin_sorted(emb, listed).sum())
    failed = int(isin_sorted(fail, listed).sum())
    stale = len(emb) + len(fail) - embedded - failed
    return {"embedded": embedded, "failed": failed, "duplicates": duplicates, "stale": stale}


class ImagesDeferred(StoreUnavailable):
    """Images whose read still failed for a transient reason after the retry budget: committed
    nowhere (a resume embeds them). ``record``: the stage's counts when it stopped, for the
    ``failed`` record in run.json."""

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


def check_counts(
    run_dir: str, listed_ids: np.ndarray, deferred: int, deferred_error: str
) -> dict[str, int]:
    """The committed counts (``count_outputs``) once the stage is done, checked: no image twice,
    and ``listed = embedded + failed`` (+ ``deferred``: then ``ImagesDeferred`` is raised)."""
    counts = count_outputs(run_dir, listed_ids)
    listed = len(listed_ids)
    if counts["duplicates"]:
        raise RuntimeError(f"{counts['duplicates']} image ids appear twice in {run_dir}")
    if deferred and counts["embedded"] + counts["failed"] + deferred == listed:
        raise ImagesDeferred(
            f"{deferred} of {listed} images could not be read: the store was unreachable for "
            f"longer than storage.retry_seconds={storage.retry_policy().seconds:g} s (last error: "
            f"{deferred_error[:300]}). They are not failures: {counts['embedded']} embedded and "
            f"{counts['failed']} failed images are committed, and `--mode resume` embeds the rest",
            {
                "listed": listed,
                "embedded": counts["embedded"],
                "failed": counts["failed"],
                "deferred": deferred,
                "last_read_error": deferred_error[:2000],
            },
        )
    if counts["embedded"] + counts["failed"] != listed:
        raise RuntimeError(
            f"listed={listed} but embedded={counts['embedded']} + failed={counts['failed']}; "
            "run again with --mode resume to finish the missing images"
        )
    return counts
