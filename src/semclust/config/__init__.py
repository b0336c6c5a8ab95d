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

from semclust.config.review import (
    AddConfig,
    EvaluateConfig,
    LabelConfig,
    RefineConfig,
    ReportConfig,
)
from semclust.config.sections import (
    ClusterConfig,
    EmbedConfig,
    GraphConfig,
    IndexConfig,
    RayConfig,
    StorageConfig,
)
from semclust.config.values import (
    CLUSTER_INITS,
    DEVICES,
    GRAPH_METHODS,
    GRAPH_METRICS,
    HIERARCHICAL,
    INDEX_TYPES,
    KERAS_BACKENDS,
    LABEL_ASSIGNMENTS,
    MODES,
    PRECISIONS,
    REFINE_METHODS,
    RESIZE_MODES,
    SEED_METHODS,
    _choice,
    parse_bytes,
)

__all__ = [
    "CLUSTER_INITS",
    "DEVICES",
    "GRAPH_METHODS",
    "GRAPH_METRICS",
    "HIERARCHICAL",
    "INDEX_TYPES",
    "KERAS_BACKENDS",
    "LABEL_ASSIGNMENTS",
    "MODES",
    "PRECISIONS",
    "REFINE_METHODS",
    "RESIZE_MODES",
    "SEED_METHODS",
    "AddConfig",
    "ClusterConfig",
    "EmbedConfig",
    "EvaluateConfig",
    "GraphConfig",
    "IndexConfig",
    "LabelConfig",
    "RayConfig",
    "RefineConfig",
    "ReportConfig",
    "RunConfig",
    "StorageConfig",
    "_choice",
    "load_config",
    "parse_bytes",
    "replace",
]


@dataclass(frozen=True)
class RunConfig:
    run_dir: str | None = None
    mode: str = "resume"
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    add: AddConfig = field(default_factory=AddConfig)

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
        nullable = len(args) < len(typing.get_args(tp))
        if nullable and (
            value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        ):
            return None
        # Try each member in declared order (``int | str`` keeps 12 an int and "auto" a str).
        first_error: ValueError | None = None
        for arg in args:
            try:
                return _coerce(name, value, arg)
            except ValueError as exc:
                first_error = first_error or exc
        assert first_error is not None
        raise first_error
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


def from_dict(tree: dict[str, Any], *, known_only: bool = False) -> RunConfig:
    """A validated RunConfig from a nested mapping (run.json's ``config``); ``known_only``
    leaves out keys this version does not have (a run recorded by another semclust)."""
    return _build(RunConfig, _known(RunConfig, tree) if known_only else tree, "")


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    hints = _field_types(cls)
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name not in hints:
            continue
        tp = hints[name]
        out[name] = (
            _known(tp, value) if _is_dataclass_type(tp) and isinstance(value, dict) else value
        )
    return out


def replace(cfg: RunConfig, **dotted: Any) -> RunConfig:
    """A copy of ``cfg`` with dotted keys replaced (``replace(cfg, **{"cluster.k": 5})``)."""
    tree = cfg.to_dict()
    for key, value in dotted.items():
        _set_dotted(tree, key, value)
    return _build(RunConfig, tree, "")
