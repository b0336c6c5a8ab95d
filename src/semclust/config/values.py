"""Allowed values and checks shared by the config sections, and ``flag``: a field with its
command-line flag (the CLI's flags are generated from these)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

DEVICES = ("auto", "cpu", "gpu")
MODES = ("resume", "overwrite")
RESIZE_MODES = ("center_crop", "squash", "pad")
KERAS_BACKENDS = ("tensorflow", "jax", "torch")
GRAPH_METRICS = ("cosine", "l2")
GRAPH_METHODS = ("auto", "exact", "ivf", "hnsw")
INDEX_TYPES = ("auto", "flat", "ivf_flat", "ivf_pq", "hnsw")
CLUSTER_INITS = ("kmeans++", "random")
HIERARCHICAL = ("auto", "on", "off")
REFINE_METHODS = ("scan", "dec")
LABEL_ASSIGNMENTS = ("kmeans", "scan", "dec", "auto")
SEED_METHODS = ("auto", "head", "propagation", "blend")
PRECISIONS = ("auto", "float32", "mixed")

_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^(\d+(?:\.\d*)?)\s*([KMGT]?)(?:I?B)?$")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def parse_bytes(text: str | int, name: str = "size") -> int:
    """Bytes in a size such as ``8GB``, ``512MiB``, ``1.5G`` or ``1000000``.

    K, M, G and T are binary multiples (``8GB`` and ``8GiB`` are both 8 x 2**30 bytes), as memory
    sizes are usually meant.
    """
    match = _SIZE_RE.match(str(text).strip().upper())
    value = float(match.group(1)) * _BYTE_UNITS[match.group(2)] if match else 0.0
    if isinstance(text, bool) or value < 1:
        raise ValueError(
            f"{name}={text!r} is not a size; write a positive number with an optional unit, "
            "e.g. 8GB, 512MB, 1.5G"
        )
    return int(value)


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def flag(default: Any, name: str, help: str, *, parse: Any = None, const: Any = None) -> Any:
    """A config field set on the command line by ``name`` (``--k``) as well as by its dotted key.

    ``parse`` converts the flag's text (default: the field's type); ``const`` makes a switch that
    stores that value (``--whiten`` -> True, ``--no-normalize`` -> False).
    """
    meta = {"flag": name, "help": help, "parse": parse, "const": const}
    return dataclasses.field(default=default, metadata=meta)


def k_value(text: str) -> int | str:
    """``--k``: an integer, or ``auto``."""
    import argparse

    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None
