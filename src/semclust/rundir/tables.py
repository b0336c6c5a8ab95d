"""Building and reading the run directory's tables after the embeddings: assignments, ``knn/``,
``duplicates/`` and the index's ids (schemas in ``schemas``, folder names in ``layout``).

Every stage, evaluate and the report read these through here, so a table's layout is known in
one place. Readers go part by part where a table can be large (``iter_knn``) and whole where it
is small or the caller wants it so (``read_knn``, ``read_duplicates``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semclust import storage
from semclust.errors import UserError
from semclust.rundir import schemas
from semclust.rundir.layout import ASSIGNMENTS, DUPLICATES, INDEX, KNN

# The index's files (index/): the FAISS index, row -> image id/URI, and meta.json, written last.
INDEX_FILE = "index.faiss"
INDEX_IDS = "ids.parquet"
INDEX_META = "meta.json"
INDEX_RERANK = "vectors.f16.npy"  # IVF-PQ with re-ranking: float16 rows, similarity space
INDEX_FORMAT = 2  # meta.json "format": rows numbered in shard order (format 1 stored image ids)


def part_uri(run_dir: str, folder: str, shard_uri: str) -> str:
    """The part of ``folder`` made from an embeddings shard: the same file name (part number)."""
    return storage.join(run_dir, folder, shard_uri.rsplit("/", 1)[-1])


def _matrix(table: pa.Table, column: str, dtype: type) -> np.ndarray:
    """A fixed-size list column as an array (rows, list size) of ``dtype``."""
    width = table.schema.field(column).type.list_size
    flat = pc.list_flatten(table.column(column)).to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=dtype).reshape(-1, width)


# --- assignments ---------------------------------------------------------------------------------


def assignments_table(ids: np.ndarray, labels: np.ndarray, distances: np.ndarray) -> pa.Table:
    """An assignments part from ids int (n,), clusters int (n, 2) and distances float (n, 2)
    (nearest first: columns ``cluster``/``distance`` and ``cluster_2nd``/``distance_2nd``)."""
    return pa.table(
        {
            "image_id": pa.array(ids, pa.int64()),
            "cluster": pa.array(labels[:, 0].astype(np.int32)),
            "distance": pa.array(distances[:, 0].astype(np.float32)),
            "cluster_2nd": pa.array(labels[:, 1].astype(np.int32)),
            "distance_2nd": pa.array(distances[:, 1].astype(np.float32)),
        },
        schema=schemas.ASSIGNMENTS,
    )


def read_assignments(run_dir: str, folder: str = ASSIGNMENTS) -> pa.Table:
    """Every row of an assignments folder (``layout.assignments_of(method)``), in part order."""
    uris = storage.list_shards(storage.join(run_dir, folder))
    if not uris:
        stage = "cluster" if folder == ASSIGNMENTS else "refine"
        raise UserError(f"no {folder}/ in {run_dir!r}: run `semclust {stage}` first")
    return pa.concat_tables([storage.read_parquet(u) for u in uris])


# --- knn/ ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnnPart:
    """One ``knn/`` part: each row's k nearest other images, nearest first."""

    ids: np.ndarray  # int64 (n,)
    neighbors: np.ndarray  # int64 (n, k) image ids; -1 where the search found fewer than k
    similarities: np.ndarray | None  # float32 (n, k): cosine, or minus the squared L2 distance

    @property
    def k(self) -> int:
        return int(self.neighbors.shape[1])


def knn_table(ids: np.ndarray, neighbors: np.ndarray, similarities: np.ndarray) -> pa.Table:
    """A ``knn/`` part from ids int (n,), neighbour ids int (n, k) and similarities (n, k)."""
    k = neighbors.shape[1]
    return pa.table(
        {
            "image_id": pa.array(ids, pa.int64()),
            "neighbors": pa.FixedSizeListArray.from_arrays(
                pa.array(np.ascontiguousarray(neighbors, dtype=np.int64).ravel()), k
            ),
            "similarities": pa.FixedSizeListArray.from_arrays(
                pa.array(np.ascontiguousarray(similarities, dtype=np.float32).ravel()), k
            ),
        },
        schema=schemas.knn(k),
    )


def knn_parts(run_dir: str) -> list[str]:
    """The URIs of the run's ``knn/`` parts; empty when the graph stage has not run."""
    return storage.list_shards(storage.join(run_dir, KNN))


def read_knn_part(uri: str, *, similarities: bool = True) -> KnnPart:
    """One ``knn/`` part (``similarities=False`` skips reading that column)."""
    columns = ["image_id", "neighbors", *(["similarities"] if similarities else [])]
    table = storage.read_parquet(uri, columns)
    return KnnPart(
        ids=table.column("image_id").to_numpy(),
        neighbors=_matrix(table, "neighbors", np.int64),
        similarities=_matrix(table, "similarities", np.float32) if similarities else None,
    )


def iter_knn(run_dir: str, *, similarities: bool = True) -> Iterator[KnnPart]:
    """The ``knn/`` parts one at a time, in part order (memory: one part)."""
    for uri in knn_parts(run_dir):
        yield read_knn_part(uri, similarities=similarities)


def read_knn(run_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole kNN graph: (image ids int64 (n,), neighbour ids int64 (n, k), similarities
    float32 (n, k)), in part order; a run without ``knn/`` raises ``UserError``."""
    parts = list(iter_knn(run_dir))
    if not parts:
        raise UserError(f"no kNN graph in {run_dir!r}: run `semclust graph` first")
    if len({p.k for p in parts}) > 1:
        raise UserError(f"knn/ parts in {run_dir!r} have different k: run `semclust graph` again")
    sims = [p.similarities for p in parts if p.similarities is not None]
    return (
        np.concatenate([p.ids for p in parts]),
        np.concatenate([p.neighbors for p in parts]),
        np.concatenate(sims),
    )


# --- duplicates/ ---------------------------------------------------------------------------------


def duplicates_table(ids: np.ndarray, groups: np.ndarray) -> pa.Table:
    """A ``duplicates/`` part from image ids int (m,) and their group ids int (m,)."""
    return pa.table(
        {"image_id": pa.array(ids, pa.int64()), "group": pa.array(groups, pa.int64())},
        schema=schemas.DUPLICATES,
    )


def read_duplicates(run_dir: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(image ids int64 (m,), group int64 (m,)) of every image in a near-duplicate group (a
    group's id is its smallest image id); None when the run has no ``duplicates/``."""
    uris = storage.list_shards(storage.join(run_dir, DUPLICATES))
    if not uris:
        return None
    table = pa.concat_tables([storage.read_parquet(u, ["image_id", "group"]) for u in uris])
    return table.column("image_id").to_numpy(), table.column("group").to_numpy()


# --- index/ --------------------------------------------------------------------------------------


def index_file(run_dir: str, name: str) -> str:
    """The URI of one of the index's files (``INDEX_FILE``, ``INDEX_IDS``, ``INDEX_META``)."""
    return storage.join(run_dir, INDEX, name)


def read_index_ids(run_dir: str) -> tuple[np.ndarray, pa.ChunkedArray, np.ndarray]:
    """(image ids int64 (n,), URIs string (n,), frame times float32 (n,): NaN for a still image)
    of index rows 0..n-1 (``index/ids.parquet``; one built before videos has no frame times).

    The URIs stay chunked (``take`` works across chunks): one string array of 10^7 URIs can
    pass the 2 GiB a string array's offsets can address."""
    from semclust.rundir.frames import read_with_frame_times

    table = read_with_frame_times(index_file(run_dir, INDEX_IDS), ["image_id", "uri"])
    times = table.column("frame_time").to_numpy(zero_copy_only=False).astype(np.float32)
    return table.column("image_id").to_numpy(), table.column("uri"), times
