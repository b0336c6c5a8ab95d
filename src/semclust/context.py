"""The run context: what every stage gets, and the one path by which storage settings reach
Ray workers.

A stage never reads a module setting or the environment for its storage options: the driver's
``RunContext`` holds the config's ``storage`` section (resolved against the driver's AWS
environment), enters it around the stage (``storage.using``), and binds it to every function or
class it sends to Ray (``bind`` / ``remote``). A worker on another node, which has only its own
environment, gets the driver's endpoint, region, profile and retry budget with each call.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from semclust import storage
from semclust.config import RunConfig, StorageConfig

T = TypeVar("T")


class Held(Protocol):
    """A held run directory (``lock.RunDirLock``): ``ensure_held`` raises when it was lost."""

    def ensure_held(self) -> None: ...


@dataclass
class RunContext:
    """One stage's view of the run: its config, the storage settings, the lock, Ray."""

    cfg: RunConfig
    command: str = "semclust"
    lock: Held | None = None
    # The stage's record in run.json before this run (empty when it never ran): a stage compares
    # its settings with it to resume or to return it unchanged when nothing is left to do.
    previous: dict[str, Any] = field(default_factory=dict)
    # What decides the stage's outputs this time (the stage's ``settings(ctx)``).
    settings: dict[str, Any] = field(default_factory=dict)
    # What a stage's settings() found that its run() goes on with (embed: the opened listing).
    state: dict[str, Any] = field(default_factory=dict)
    _embeddings: Any = field(default=None, repr=False)

    @property
    def run_dir(self) -> str:
        if not self.cfg.run_dir:
            from semclust.errors import UserError

            raise UserError("no run directory given: pass --run-dir (or set run_dir)")
        return self.cfg.run_dir

    @property
    def mode(self) -> str:
        return self.cfg.mode

    @property
    def resumable(self) -> bool:
        """Whether outputs of the stage's earlier run may be kept: ``--mode resume`` and the same
        settings as then."""
        return (
            self.mode == "resume"
            and bool(self.previous)
            and (self.previous.get("settings") == self.settings)
        )

    def embeddings(self) -> Any:
        """The run's committed embeddings shards (``rundir.embeddings.ShardSet``), read once."""
        if self._embeddings is None:
            from semclust.rundir.embeddings import embedding_shards

            self._embeddings = embedding_shards(self.run_dir)
        return self._embeddings

    @functools.cached_property
    def storage(self) -> StorageConfig:
        """The config's storage section with the driver's AWS environment filled in."""
        return storage.resolved(self.cfg.storage)

    def ensure_held(self) -> None:
        """Raise ``RunDirLocked`` when another run took the directory over (before a commit)."""
        if self.lock is not None:
            self.lock.ensure_held()

    def start_ray(self) -> Any:
        """Join or start Ray (``ray`` config section, RAY_ADDRESS); the ``ray`` module."""
        import ray

        from semclust.ray_runtime import ensure_ray

        ensure_ray(self.cfg.ray)
        return ray

    def bind(self, target: T) -> T:
        """``target`` (a function, generator function or class) running under this run's storage
        settings wherever it is called: the form for Ray Data's ``map_batches`` and read tasks."""
        return bind_storage(target, self.storage)

    def remote(self, target: Any, **options: Any) -> Any:
        """``ray.remote`` of ``bind(target)`` with ``options`` (num_cpus, num_gpus, ...)."""
        ray = self.start_ray()
        remote = ray.remote(self.bind(target))
        return remote.options(**options) if options else remote


def bind_storage(target: T, section: StorageConfig) -> T:
    """``target`` with ``storage.using(section)`` around every call (each method of a class)."""
    if isinstance(target, type):
        return _bind_class(target, section)  # type: ignore[return-value]
    return _bind_function(target, section)  # type: ignore[arg-type]


def _bind_function(fn: Callable[..., Any], section: StorageConfig) -> Callable[..., Any]:
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generate(*args: Any, **kwargs: Any) -> Iterator[Any]:
            # Every step of the generator runs in a context holding the settings: a `with`
            # around the generator's creation would have ended before its first item.
            ctx = contextvars.copy_context()
            ctx.run(storage.activate, section)
            items = ctx.run(fn, *args, **kwargs)
            while True:
                try:
                    item = ctx.run(next, items)
                except StopIteration:
                    return
                yield item

        return generate

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with storage.using(section):
            return fn(*args, **kwargs)

    return call


def _bind_class(cls: type, section: StorageConfig) -> type:
    namespace: dict[str, Any] = {"__module__": cls.__module__, "__doc__": cls.__doc__}
    for name, member in inspect.getmembers(cls, inspect.isfunction):
        if name.startswith("__") and name not in ("__init__", "__call__"):
            continue
        namespace[name] = _bind_function(member, section)
    bound = type(cls.__name__, (cls,), namespace)
    bound.__qualname__ = cls.__qualname__
    return bound
