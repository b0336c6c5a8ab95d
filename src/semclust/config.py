"""Run configuration: one frozen dataclass per stage, nested in a RunConfig.

Loaded from YAML, overridden by CLI flags (dotted keys such as ``embed.batch_size=64``), and
validated on construction: a bad value raises ``ValueError`` naming the allowed values, so a run
stops before any work is done.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEVICES = ("auto", "cpu", "gpu")
MODES = ("resume", "overwrite")
RESIZE_MODES = ("center_crop", "squash", "pad")
KERAS_BACKENDS = ("tensorflow", "jax", "torch")
GRAPH_METRICS = ("cosine", "l2")
INDEX_TYPES = ("flat",)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass(frozen=True)
class RayConfig:
    """Where the stages run. ``address=None`` starts (or joins, via RAY_ADDRESS) a local Ray."""

    address: str | None = None
    num_cpus: int | None = None  # local Ray only; None lets Ray count the machine's cores

    def __post_init__(self) -> None:
        if self.num_cpus is not None:
            _positive("ray.num_cpus", self.num_cpus)


@dataclass(frozen=True)
class EmbedConfig:
    """Images -> embeddings/ and failures/."""

    input: str | None = None  # folder, file:// or s3:// prefix
    backbone: str = "resnet50"
    # "imagenet" (Keras download/cache), "random" (seeded), "default" (the backbone's packaged
    # weights, efficientnet_lite0 only), or a path to a weights / .keras / .pth file.
    weights: str = "imagenet"
    image_size: int | None = None  # None: the backbone's native input size
    resize: str = "center_crop"
    normalize: bool = True  # L2-normalise embeddings
    batch_size: int = 32  # images per model call
    decode_batch_size: int = 64  # images per decode task batch
    num_actors: int = 1  # minimum size of the model actor pool
    max_actors: int | None = None  # autoscaling bound; None = num_actors
    actor_num_cpus: float = 1.0
    decode_num_cpus: float = 1.0
    device: str = "auto"
    keras_backend: str = "tensorflow"
    rows_per_part: int = 50_000  # rows per embeddings/ shard
    max_image_pixels: int = 178_956_970  # decompression-bomb limit (Pillow's default x2)
    seed: int = 0  # for random weights; every actor builds the same model

    def __post_init__(self) -> None:
        _choice("embed.resize", self.resize, RESIZE_MODES)
        _choice("embed.device", self.device, DEVICES)
        _choice("embed.keras_backend", self.keras_backend, KERAS_BACKENDS)
        for name in ("batch_size", "decode_batch_size", "num_actors", "rows_per_part"):
            _positive(f"embed.{name}", getattr(self, name))
        _positive("embed.max_image_pixels", self.max_image_pixels)
        _positive("embed.actor_num_cpus", self.actor_num_cpus, allow_zero=True)
        _positive("embed.decode_num_cpus", self.decode_num_cpus, allow_zero=True)
        if self.image_size is not None and self.image_size < 32:
            raise ValueError(f"embed.image_size must be >= 32, got {self.image_size}")
        if self.max_actors is not None and self.max_actors < self.num_actors:
            raise ValueError(
                f"embed.max_actors ({self.max_actors}) must be >= embed.num_actors "
                f"({self.num_actors})"
            )
        # Imported late: the registry imports nothing heavy, but keeps config free of cycles.
        from semclust.embed.backbones import BACKBONES

        _choice("embed.backbone", self.backbone, tuple(sorted(BACKBONES)))


@dataclass(frozen=True)
class ClusterConfig:
    """embeddings/ -> model/ and assignments/ (FAISS k-means)."""

    k: int = 100
    niter: int = 20
    spherical: bool = True
    max_points_per_centroid: int = 256  # training sample is at most this x k rows
    nredo: int = 1
    seed: int = 1234
    device: str = "auto"
    num_tasks: int | None = None  # parallel assignment tasks; None = one per shard

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError(f"cluster.k must be >= 2, got {self.k}")
        for name in ("niter", "max_points_per_centroid", "nredo"):
            _positive(f"cluster.{name}", getattr(self, name))
        _choice("cluster.device", self.device, DEVICES)


@dataclass(frozen=True)
class GraphConfig:
    """embeddings/ -> knn/ (exact FAISS kNN graph)."""

    k: int = 10
    metric: str = "cosine"
    num_actors: int = 1
    query_batch_size: int = 4096
    device: str = "auto"

    def __post_init__(self) -> None:
        _positive("graph.k", self.k)
        _positive("graph.num_actors", self.num_actors)
        _positive("graph.query_batch_size", self.query_batch_size)
        _choice("graph.metric", self.metric, GRAPH_METRICS)
        _choice("graph.device", self.device, DEVICES)


@dataclass(frozen=True)
class IndexConfig:
    """embeddings/ -> index/ (searchable FAISS index)."""

    type: str = "flat"
    metric: str = "cosine"

    def __post_init__(self) -> None:
        _choice("index.type", self.type, INDEX_TYPES)
        _choice("index.metric", self.metric, GRAPH_METRICS)


@dataclass(frozen=True)
class RunConfig:
    run_dir: str | None = None
    mode: str = "resume"
    ray: RayConfig = field(default_factory=RayConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading ---------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML or command-line value to the field's declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(name, value, args[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
        raise ValueError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)} in {where}; "
            f"allowed: {', '.join(names)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ValueError(f"config section '{prefix}{name}' must be a mapping")
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"cannot set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Build a validated RunConfig from an optional YAML file and dotted-key overrides.

    Overrides win over the file; both are checked against the dataclasses, so an unknown key or a
    bad value stops with a message naming what is allowed.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {str(p)!r} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {str(p)!r} must hold a mapping at the top level")
        tree = loaded
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    return _build(RunConfig, tree, "")


def replace(cfg: RunConfig, **dotted: Any) -> RunConfig:
    """A copy of ``cfg`` with dotted keys replaced (``replace(cfg, **{"cluster.k": 5})``)."""
    tree = cfg.to_dict()
    for key, value in dotted.items():
        _set_dotted(tree, key, value)
    return _build(RunConfig, tree, "")
