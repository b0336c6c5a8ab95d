"""FAISS plumbing shared by the cluster, graph and index stages: GPUs, threads, search settings.

The GPU path is chosen at run time: ``device=auto`` uses every GPU FAISS sees in the process
(faiss-gpu on a CUDA node), ``cpu`` never does, and ``gpu`` fails loudly when there is none. The
CPU path is the same code with the GPU steps left out, so CI exercises everything else.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Any

import numpy as np

from semclust import storage

log = logging.getLogger(__name__)


def faiss_gpu_count() -> int:
    """GPUs FAISS can use in this process: 0 with faiss-cpu or on a node without CUDA devices."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def resolve_gpus(device: str, where: str) -> int:
    """GPUs to use in this process for ``device`` (auto|cpu|gpu); ``gpu`` without one raises."""
    if device == "cpu":
        return 0
    count = faiss_gpu_count()
    if device == "auto" and count == 0 and os.environ.get("CUDA_VISIBLE_DEVICES", "").strip():
        # Ray gave this worker a GPU, but this FAISS build cannot use it.
        log.warning("%s: a GPU is assigned but FAISS has no GPU support (faiss-cpu?)", where)
    if device == "gpu" and count == 0:
        raise RuntimeError(
            f"{where}: device=gpu was asked for, but FAISS sees no GPU in this process; install "
            "faiss-gpu on the GPU nodes (faiss-cpu has no GPU support) or use device=auto|cpu"
        )
    return count


def set_threads(num_cpus: float | None) -> int:
    """Give FAISS (OpenMP) as many threads as the task claimed CPUs.

    Ray sets OMP_NUM_THREADS to the task's CPU count, but FAISS reads it once at import, and a
    fractional claim rounds to 0; setting it here makes the choice explicit.
    """
    import faiss

    threads = max(1, int(num_cpus)) if num_cpus else (os.cpu_count() or 1)
    faiss.omp_set_num_threads(threads)
    return threads


def claimed_cpus() -> float | None:
    """CPUs the current Ray task/actor claimed; None outside Ray (a direct call)."""
    import ray

    if not ray.is_initialized():  # a direct call; asking would start a Ray instance
        return None
    try:
        return ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # outside Ray (a direct call): let FAISS use every core
        return None


def to_gpus(index: Any, *, fp16: bool = False, shard: bool = True) -> Any:
    """Clone a CPU index onto every GPU of the process.

    ``shard=True`` splits the vectors across GPUs (capacity grows with the GPU count; each query
    visits every shard); ``fp16`` stores flat vectors in float16 (``GpuIndexFlatConfig.useFloat16``
    through the cloner options), which halves their memory at a small cost in precision.
    """
    import faiss

    options = faiss.GpuMultipleClonerOptions()
    options.shard = shard
    options.useFloat16 = fp16
    return faiss.index_cpu_to_all_gpus(index, co=options)


def set_search_params(
    index: Any, *, nprobe: int | None = None, ef_search: int | None = None, on_gpu: bool = False
) -> None:
    """Set IVF ``nprobe`` / HNSW ``efSearch`` on a CPU or GPU index (wrappers included)."""
    import faiss

    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    if nprobe is not None and _is_ivf(index):
        space.set_index_parameter(index, "nprobe", int(nprobe))
    if ef_search is not None and _is_hnsw(index):
        space.set_index_parameter(index, "efSearch", int(ef_search))


def _is_ivf(index: Any) -> bool:
    import faiss

    try:
        return faiss.try_extract_index_ivf(index) is not None
    except (AttributeError, RuntimeError):
        return hasattr(index, "nprobe")


def _is_hnsw(index: Any) -> bool:
    import faiss

    return isinstance(faiss.downcast_index(index), faiss.IndexHNSW)


def nearest_two(index: Any, x: np.ndarray, batch: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """(labels int64 (n, 2), squared L2 float32 (n, 2)) of ``x`` float32 (n, d), in batches."""
    n = len(x)
    labels = np.empty((n, 2), dtype=np.int64)
    dist = np.empty((n, 2), dtype=np.float32)
    for s in range(0, n, batch):
        d, i = index.search(np.ascontiguousarray(x[s : s + batch], dtype=np.float32), 2)
        dist[s : s + batch], labels[s : s + batch] = d, i
    return labels, dist


def serialize(index: Any) -> bytes:
    """A CPU copy of ``index`` (GPU indexes are copied back first) as bytes for storage."""
    import faiss

    if faiss_gpu_count() and hasattr(faiss, "index_gpu_to_cpu") and _on_gpu(index):
        index = faiss.index_gpu_to_cpu(index)
    return faiss.serialize_index(index).tobytes()


def _on_gpu(index: Any) -> bool:
    return type(index).__name__.startswith(("Gpu", "IndexShards", "IndexReplicas"))


def deserialize(raw: bytes) -> Any:
    import faiss

    return faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))


def load_index(uri: str, *, mmap: bool = False) -> Any:
    """Read a stored index through ``faiss.read_index``.

    ``mmap``: the vectors and IVF lists are memory-mapped instead of read
    (``IO_FLAG_MMAP_IFC``), for an index that is only searched: loading costs no memory, pages
    come in as queries touch them, and processes on one node share them through the page cache
    (a 100 MB IVF-Flat: 1 MB resident after loading, against 100 MB read). An index in object
    storage is then mapped from its local copy (``storage.local_copy``: downloaded in chunks
    once per version), never held twice in memory as bytes and as an index.
    """
    import faiss

    if storage.is_remote(uri) and not mmap:
        return deserialize(storage.read_bytes(uri))
    return faiss.read_index(storage.local_copy(uri), faiss.IO_FLAG_MMAP_IFC if mmap else 0)


def node_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the largest alive Ray node: what one task on one node can claim."""
    import ray

    cpus = gpus = 0.0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        cpus = max(cpus, float(res.get("CPU", 0)))
        gpus = max(gpus, float(res.get("GPU", 0)))
    return cpus, gpus


# FAISS's OpenMP threads spin while they wait by default. On a node whose cores are shared
# (other Ray workers, other jobs) that made k-means 3-20x slower with 2 threads on a 2-core
# machine; sleeping waits cost little when the node is idle. It must be set before the process
# loads OpenMP, hence through the Ray worker's environment.
FAISS_WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def remote_options(**resources: Any) -> dict[str, Any]:
    """``.options(...)`` for a Ray task or actor running FAISS: resources + worker environment."""
    return {**resources, "runtime_env": {"env_vars": dict(FAISS_WORKER_ENV)}}


def task_resources(device: str, num_cpus: float | None) -> dict[str, Any]:
    """Ray resources for one heavy FAISS task (training, index build) on one node.

    With a GPU it claims all of that node's GPUs (FAISS then uses them all); otherwise the CPUs
    asked for, or every CPU of the largest node, so FAISS's threads are not oversubscribed.
    """
    from semclust.ray_runtime import use_gpu

    cpus, gpus = node_resources()
    claim = {"num_cpus": float(num_cpus) if num_cpus else max(1.0, cpus)}
    if use_gpu(device) and gpus > 0:
        claim["num_gpus"] = gpus
    return remote_options(**claim)


def store_index(index: Any, uri: str) -> int:
    """Write a CPU index to ``uri`` atomically (local: temp file + rename); returns its bytes."""
    import faiss

    if storage.is_remote(uri):
        raw = serialize(index)
        storage.write_bytes(uri, raw)
        return len(raw)
    _, path = storage.resolve(uri)
    storage.makedirs(os.path.dirname(path))
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    faiss.write_index(index, tmp)
    os.replace(tmp, path)
    return os.path.getsize(path)


# FAISS 1.15's distance_compute_blas_threshold is 128,000: below it, distance blocks go through
# SIMD loops instead of BLAS. A bucketed scan is one list's few hundred queries against its few
# thousand rows: there BLAS was 2.4-3x faster (244 x 1,170 and 244 x 2,441 at 256-d, 2 threads),
# and 20 is the threshold FAISS used to have. Only the bucketed searches change it: elsewhere
# results stay those of the SIMD loops, which do not depend on how queries are batched.
_BUCKET_BLAS_THRESHOLD = 20


def bucketed_search(
    ivf: Any, x: np.ndarray, k: int, q_assign: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``faiss.contrib.big_batch_search`` of float32 rows ``x`` in an IVF (each list scanned once
    for all the rows that probe it, as a matrix product): (distances (n, k), labels (n, k)),
    the results of ``ivf.search`` at its nprobe. ``q_assign``: the rows' nearest lists, int32
    (n, nprobe), when known (it is sorted in place)."""
    import faiss
    from faiss.contrib.big_batch_search import big_batch_search

    cvar = faiss.cvar
    before = cvar.distance_compute_blas_threshold
    cvar.distance_compute_blas_threshold = _BUCKET_BLAS_THRESHOLD
    try:
        # It prints its progress to stdout even at verbose=0; that belongs in no log.
        with contextlib.redirect_stdout(io.StringIO()):
            return big_batch_search(ivf, x, k, threaded=1, q_assign=q_assign)
    finally:
        cvar.distance_compute_blas_threshold = before
