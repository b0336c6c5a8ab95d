"""Connecting to Ray and choosing CPU or GPU at run time."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from semclust.config import RayConfig

log = logging.getLogger(__name__)


def ensure_ray(cfg: RayConfig) -> None:
    """Join the configured cluster or RAY_ADDRESS (set by ``ray job submit``), else start Ray."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with _keeping_sigterm_handler():
        _init(ray, cfg)


@contextlib.contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """Ray's core worker installs its own SIGTERM handler, which aborts the process (exit -6):
    put back the Python one (the CLI's: stop as Ctrl-C does, record it, exit 143)."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    yield
    if main and callable(handler):
        signal.signal(signal.SIGTERM, handler)


def _init(ray: Any, cfg: RayConfig) -> None:
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        if cfg.num_cpus or cfg.object_store_memory:
            log.warning("ray.num_cpus and ray.object_store_memory apply to a local Ray only")
        ray.init(address=address, log_to_driver=True)
        log.info("joined Ray cluster at %s", address)
        return
    from semclust.config import parse_bytes

    store = parse_bytes(cfg.object_store_memory) if cfg.object_store_memory else None
    try:
        ray.init(
            # "local": a Ray of this process's own. Without it ray.init joins any `ray start`
            # cluster it finds on the machine (and then refuses num_cpus).
            address="local",
            num_cpus=cfg.num_cpus,
            object_store_memory=store,
            include_dashboard=False,
            log_to_driver=True,
        )
    except Exception as exc:
        if "timed out during startup" not in str(exc):
            raise
        from semclust.errors import RunFailed

        # Ray gives its processes a fixed 30 s to register: an overloaded machine, not a bug.
        raise RunFailed(
            f"the local Ray did not start in time ({exc}); the machine is probably overloaded: "
            "run the same command again (--mode resume) when it is quieter"
        ) from exc
    log.info("started a local Ray with %s CPUs", ray.cluster_resources().get("CPU"))


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def use_gpu(device: str) -> bool:
    """Resolve ``auto|cpu|gpu`` against the cluster; asking for a GPU that is not there fails."""
    if device == "cpu":
        return False
    has = cluster_has_gpus()
    if device == "gpu" and not has:
        raise RuntimeError("device=gpu was asked for but the Ray cluster reports no GPU")
    return has


class _OneLineErrors(logging.Filter):
    """A Ray Data error on the console as one line: the traceback stays in Ray's session log
    (its file handler runs first), the user gets semclust's own message with what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {first})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def one_line_ray_data_errors() -> None:
    """Keep Ray Data's console log free of tracebacks (not with ``-v``): a failed task is a
    run that failed, which semclust reports in one message, not a crash."""
    if logging.getLogger("semclust").isEnabledFor(logging.DEBUG):
        return
    import ray.data  # noqa: F401  (configures the ray.data logger and its handlers)

    for handler in logging.getLogger("ray.data").handlers:
        stream = isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        )
        if stream and not any(isinstance(f, _OneLineErrors) for f in handler.filters):
            handler.addFilter(_OneLineErrors())
