"""The run directory's ``run.json``: resolved config, versions, per-stage counts and timings."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from semclust import storage

log = logging.getLogger(__name__)

_VERSIONED = (
    "semclust",
    "ray",
    "tensorflow",
    "keras",
    "faiss-cpu",
    "faiss-gpu-cu12",
    "numpy",
    "pyarrow",
    "scikit-learn",
    "pillow",
)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def run_json_uri(run_dir: str) -> str:
    return storage.join(run_dir, "run.json")


def load(run_dir: str) -> dict[str, Any]:
    uri = run_json_uri(run_dir)
    return storage.read_json(uri) if storage.exists(uri) else {}


def update_stage(
    run_dir: str,
    stage: str,
    record: dict[str, Any],
    config: dict[str, Any],
    section: str | None = None,
) -> None:
    """Merge one stage's record into run.json (the driver is the only writer).

    Only the stage's own config ``section`` (default: its name) and the top-level settings are
    replaced: a later ``semclust cluster`` must not overwrite the embed settings that a resume is
    checked against.
    """
    info = load(run_dir)
    merged = dict(info.get("config", {}))
    for key, value in config.items():
        if key == (section or stage) or not isinstance(value, dict) or key not in merged:
            merged[key] = value
    info["config"] = merged
    info["versions"] = package_versions()
    info.setdefault("stages", {})[stage] = record
    storage.write_json(run_json_uri(run_dir), info)


@contextmanager
def timed(label: str) -> Iterator[dict[str, float]]:
    """Time a block; the dict gets ``seconds`` when the block ends."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = round(time.perf_counter() - start, 3)
        log.info("%s took %.1f s", label, out["seconds"])


def mark_stopped(run_dir: str, exc: BaseException) -> list[str]:
    """Mark every stage still ``running`` in run.json as ``interrupted`` (Ctrl-C, SIGTERM) or
    ``failed``, with the error; returns those stages. Best effort: when the store itself is what
    failed, run.json may be out of reach too, and the original error matters more."""
    from semclust.retry import RetryPolicy, retry_call

    if getattr(exc, "_semclust_stop_recorded", False):
        return []  # the stage recorded it already: no second wait on a store that is away
    with contextlib.suppress(AttributeError):
        exc._semclust_stop_recorded = True  # type: ignore[attr-defined]
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    cause = getattr(exc, "cause", None) or exc
    error = storage.redact(f"{type(cause).__name__}: {cause}")[:2000]
    quick = RetryPolicy(seconds=10.0)

    def record() -> list[str]:
        info = load(run_dir)
        stopped = [
            name
            for name, rec in info.get("stages", {}).items()
            if isinstance(rec, dict) and rec.get("status") == "running"
        ]
        for name in stopped:
            info["stages"][name].update(status=status, error=error)
        if stopped:
            storage.write_json(run_json_uri(run_dir), info)
        return stopped

    try:
        return retry_call(record, quick, f"record the {status} stage in run.json")
    except Exception as write_error:
        log.warning("could not record the %s stage in %s: %s", status, run_dir, write_error)
        return []
