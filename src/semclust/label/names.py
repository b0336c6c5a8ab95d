"""Labelling from cluster names a person gave after reading the report: a YAML ``id: name`` map.

Every image of a named cluster gets the name (confidence 1: a person's decision, source
``names``); images of unnamed clusters get no row. Cluster ids refer to the assignments the
person looked at (``assignments/`` by default, as in the report).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import yaml

from semclust import storage
from semclust.errors import UserError
from semclust.label.common import UNKNOWN


def read_names(uri: str, k: int) -> dict[int, str]:
    """Cluster id -> name from a YAML mapping; ids must be integers in [0, k)."""
    if not storage.exists(uri):
        raise UserError(f"names file {uri!r} does not exist")
    try:
        data = yaml.safe_load(storage.read_bytes(uri).decode("utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"names file {uri!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"names file {uri!r} must be a YAML mapping of cluster id -> name")
    out: dict[int, str] = {}
    for key, value in data.items():
        try:
            cluster = int(key)
        except (TypeError, ValueError):
            raise UserError(f"names file {uri!r}: cluster id {key!r} is not an integer") from None
        if isinstance(key, bool) or not 0 <= cluster < k or str(cluster) != str(key).strip():
            raise UserError(
                f"names file {uri!r}: cluster id {key!r} is not one of the run's clusters "
                f"0..{k - 1}"
            )
        if not isinstance(value, (str, int, float)) or not str(value).strip():
            raise UserError(f"names file {uri!r}: cluster {cluster} needs a non-empty name")
        name = str(value).strip()
        if name == UNKNOWN:
            raise UserError(f"names file {uri!r}: {UNKNOWN!r} is reserved; leave the cluster out")
        out[cluster] = name
    return out


def name_clusters(clusters: np.ndarray, names: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """(named mask bool (n,), label per row object (n,), '' where unnamed) of cluster ids (n,)."""
    lookup = np.full(int(max(clusters.max(initial=-1), max(names)) + 1), "", dtype=object)
    for c, name in names.items():
        lookup[c] = name
    labels = np.where(clusters >= 0, lookup[np.maximum(clusters, 0)], "")
    return labels != "", labels


def summary(names: dict[int, str], clusters: np.ndarray) -> dict[str, Any]:
    sizes = np.bincount(clusters[clusters >= 0], minlength=max(names) + 1)
    return {str(c): {"label": name, "size": int(sizes[c])} for c, name in sorted(names.items())}
