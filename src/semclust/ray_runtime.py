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
    ray.init(
        # "local": a Ray of this process's own. Without it ray.init joins any `ray start`
        # cluster it finds on the machine (and then refuses num_cpus).
        address="local",
        num_cpus=cfg.num_cpus,
        object_store_memory=store,
        include_dashboard=False,
        log_to_driver=True,
    )
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
