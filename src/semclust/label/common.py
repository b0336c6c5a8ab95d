"""What every labelling mode shares: the run's rows, its kNN graph, and the labels/ writer."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semclust import storage
from semclust.clustering.shards import embedding_shards, read_checked, rows_of_ids

log = logging.getLogger(__name__)

LABELS_DIR = "labels"
UNKNOWN = "unknown"
LABELS_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("label", pa.string()),
        ("confidence", pa.float32()),
        ("source", pa.string()),
    ]
)


@dataclass
class RunRows:
    """Every embedded row of a run, in shard order: ids int64 (n,), shard URIs and offsets.

    Only ids are held (8 bytes a row); embeddings are read shard by shard when needed.
    """

    ids: np.ndarray
    shard_uris: list[str]
    offsets: np.ndarray  # int64 (shards + 1,)
    dim: int

    def __post_init__(self) -> None:
        self._order = np.argsort(self.ids, kind="stable")

    @classmethod
    def load(cls, run_dir: str) -> RunRows:
        shards = embedding_shards(run_dir)
        parts = [storage.read_parquet(u, ["image_id"]).column("image_id") for u in shards.uris]
        ids = np.concatenate([p.to_numpy() for p in parts]) if parts else np.empty(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        return cls(ids, list(shards.uris), offsets, shards.dim)

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Rows int64 (same shape) of image ids; -1 for ids that are not in the run."""
        return rows_of_ids(self.ids, self._order, image_ids)

    def shards(self) -> Iterator[tuple[str, slice]]:
        """(embeddings shard URI, its rows) in order."""
        for i, uri in enumerate(self.shard_uris):
            yield uri, slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def embeddings(self) -> Iterator[tuple[str, slice, np.ndarray]]:
        """(shard URI, its rows, L2-normalised embeddings float32 (rows, D)) shard by shard."""
        from semclust.clustering.shards import normalize_rows

        for uri, rows in self.shards():
            ids, vectors = read_checked(uri, self.dim)
            if not np.array_equal(ids, self.ids[rows]):
                raise RuntimeError(f"{uri} changed while labelling; run `semclust label` again")
            yield uri, rows, normalize_rows(vectors)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """L2-normalised embeddings float32 (m, D) of the given rows (any order), streamed."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for _, span, vectors in self.embeddings():
            inside = (rows >= span.start) & (rows < span.stop)
            if inside.any():
                out[inside] = vectors[rows[inside] - span.start]
        return out


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
        raise ValueError(f"seed labels file {uri!r} must be a .parquet or .csv file")
    missing = {"uri", "label"} - set(table.column_names)
    if missing:
        raise ValueError(f"{uri!r} needs columns uri and label; missing {sorted(missing)}")
    table = table.filter(pc.is_valid(table.column("label")))
    return [str(u) for u in table["uri"].to_pylist()], [str(v) for v in table["label"].to_pylist()]


def read_graph(
    run_dir: str, rows: RunRows, max_neighbors: int | None = None
) -> tuple[Any, str] | None:
    """The run's kNN graph as a sparse (n, n) float32 matrix of edge similarities, and the
    graph metric; None when the run has no ``knn/``. Rows follow ``rows`` (shard order);
    ``max_neighbors`` keeps each row's nearest ones only."""
    import scipy.sparse as sp

    from semclust import runinfo
    from semclust.clustering.knn import KNN_DIR

    uris = storage.list_shards(storage.join(run_dir, KNN_DIR))
    if not uris:
        return None
    src_parts, dst_parts, sim_parts = [], [], []
    for uri in uris:
        table = storage.read_parquet(uri, ["image_id", "neighbors", "similarities"])
        k = table.schema.field("neighbors").type.list_size
        m = min(k, max_neighbors or k)
        src = rows.rows_of(table.column("image_id").to_numpy())
        neighbours = pc.list_flatten(table.column("neighbors").combine_chunks()).to_numpy()
        dst = rows.rows_of(neighbours.reshape(-1, k)[:, :m])
        sims = pc.list_flatten(table.column("similarities").combine_chunks()).to_numpy()
        sims = sims.reshape(-1, k)[:, :m]
        ok = (src[:, None] >= 0) & (dst >= 0) & np.isfinite(sims)
        src_parts.append(np.broadcast_to(src[:, None], dst.shape)[ok])
        dst_parts.append(dst[ok])
        sim_parts.append(sims[ok].astype(np.float32))
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

    def __init__(self, run_dir: str) -> None:
        self.dir = storage.join(run_dir, LABELS_DIR)
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
            schema=LABELS_SCHEMA,
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
