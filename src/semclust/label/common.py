"""What every labelling mode shares: the run's rows, its kNN graph, and the labels/ writer."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semclust import runinfo, storage
from semclust.errors import UserError
from semclust.rundir import schemas
from semclust.rundir.embeddings import RunRows
from semclust.rundir.layout import LABELS
from semclust.rundir.tables import iter_knn

log = logging.getLogger(__name__)

UNKNOWN = "unknown"


def uri_key(uri: str) -> int:
    """The image id of a URI or local path as the embed stage computed it."""
    return storage.image_id_for(uri if storage.is_remote(uri) else storage.canonical_uri(uri))


def read_uri_labels(uri: str) -> tuple[list[str], list[str]]:
    """(uris, labels) from a Parquet or CSV file with ``uri`` and ``label`` columns."""
    if uri.endswith(".csv"):
        import pyarrow.csv as pacsv

        fs, path = storage.resolve(uri)
        with fs.open_input_stream(path) as f:
            table = pacsv.read_csv(f)
    elif uri.endswith(".parquet") or storage.is_dir(uri):
        table = storage.read_parquet(uri)
    else:
        raise UserError(f"seed labels file {uri!r} must be a .parquet or .csv file")
    missing = {"uri", "label"} - set(table.column_names)
    if missing:
        raise UserError(f"{uri!r} needs columns uri and label; missing {sorted(missing)}")
    table = table.filter(pc.is_valid(table.column("label")))
    return [str(u) for u in table["uri"].to_pylist()], [str(v) for v in table["label"].to_pylist()]


def read_graph(
    run_dir: str, rows: RunRows, max_neighbors: int | None = None
) -> tuple[Any, str] | None:
    """The run's kNN graph as a sparse (n, n) float32 matrix of edge similarities, and the
    graph metric; None when the run has no ``knn/``. Rows follow ``rows`` (shard order);
    ``max_neighbors`` keeps each row's nearest ones only."""
    import scipy.sparse as sp

    src_parts, dst_parts, sim_parts = [], [], []
    for part in iter_knn(run_dir):
        m = min(part.k, max_neighbors or part.k)
        assert part.similarities is not None
        src = rows.rows_of(part.ids)
        dst = rows.rows_of(part.neighbors[:, :m])
        sims = part.similarities[:, :m]
        ok = (src[:, None] >= 0) & (dst >= 0) & np.isfinite(sims)
        src_parts.append(np.broadcast_to(src[:, None], dst.shape)[ok])
        dst_parts.append(dst[ok])
        sim_parts.append(sims[ok].astype(np.float32))
    if not src_parts:
        return None
    n = len(rows)
    graph = sp.csr_matrix(
        (np.concatenate(sim_parts), (np.concatenate(src_parts), np.concatenate(dst_parts))),
        shape=(n, n),
    )
    metric = runinfo.load(run_dir).get("stages", {}).get("graph", {}).get("metric", "cosine")
    return graph, metric


def edge_weights(graph: Any, metric: str, power: float = 3.0) -> Any:
    """Non-negative affinities from edge similarities: max(cos, 0)^power for cosine graphs,
    exp(-d / median d) for L2 graphs (whose similarity is minus the squared distance)."""
    g = graph.copy()
    if metric == "cosine":
        g.data = np.maximum(g.data, 0.0) ** power
    else:
        d = -g.data
        scale = float(np.median(d)) if len(d) else 1.0
        g.data = np.exp(-d / max(scale, 1e-12))
    g.eliminate_zeros()
    return g


class LabelWriter:
    """Writes ``labels/part-NNNNN.parquet``, one shard per embeddings shard (same number)."""

    def __init__(self, run_dir: str, *, fresh: bool = True) -> None:
        # labels/ is rewritten whole every time: shards of an earlier labelling must not survive
        # (``fresh=False``: shards added to it, for images added to the run).
        self.dir = storage.join(run_dir, LABELS)
        if fresh:
            storage.remove_tree(self.dir)
        self.written = 0
        self._counts: dict[str, int] = {}
        self._confidence: dict[str, float] = {}

    def write(
        self,
        shard_uri: str,
        ids: np.ndarray,
        labels: list[str] | np.ndarray,
        confidence: np.ndarray,
        source: list[str] | np.ndarray,
    ) -> None:
        table = pa.table(
            {
                "image_id": pa.array(np.asarray(ids, dtype=np.int64), pa.int64()),
                "label": pa.array([str(v) for v in labels], pa.string()),
                "confidence": pa.array(np.asarray(confidence, dtype=np.float32), pa.float32()),
                "source": pa.array([str(v) for v in source], pa.string()),
            },
            schema=schemas.LABELS,
        )
        name = shard_uri.rsplit("/", 1)[-1]
        storage.write_parquet(storage.join(self.dir, name), table)
        self.written += table.num_rows
        grouped = table.group_by("label").aggregate(
            [("confidence", "count"), ("confidence", "sum")]
        )
        for row in grouped.to_pylist():
            label = row["label"]
            self._counts[label] = self._counts.get(label, 0) + row["confidence_count"]
            self._confidence[label] = self._confidence.get(label, 0.0) + row["confidence_sum"]

    def summary(self) -> dict[str, dict[str, Any]]:
        """``{label: {"count", "mean_confidence"}}`` over every row written, largest first."""
        order = sorted(self._counts, key=lambda label: (-self._counts[label], label))
        return {
            label: {
                "count": self._counts[label],
                "mean_confidence": round(self._confidence[label] / self._counts[label], 5),
            }
            for label in order
        }
