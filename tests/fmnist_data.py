"""Fashion-MNIST from Debian's `dataset-fashion-mnist` (IDX files), for tests and benchmarks."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a NumPy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(directory: Path = FMNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (70000, 28, 28), labels uint8 (70000,)): train then test."""
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory} is missing: apt-get install dataset-fashion-mnist (Debian)"
        )
    images = [read_idx(directory / f"{s}-images-idx3-ubyte.gz") for s in ("train", "t10k")]
    labels = [read_idx(directory / f"{s}-labels-idx1-ubyte.gz") for s in ("train", "t10k")]
    return np.concatenate(images), np.concatenate(labels)
