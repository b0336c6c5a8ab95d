"""Read PyTorch *legacy* (pre-zip) ``torch.save`` state_dicts with NumPy alone.

The legacy format is a run of pickles on one stream:

1. the magic number ``0x1950a86a20f9469cfc6c``,
2. the protocol version ``1001``,
3. a sys-info dict (``little_endian``, ``type_sizes``, ...),
4. the object itself (here a state_dict), whose tensors refer to storages through persistent ids
   ``('storage', <torch.XStorage>, key, location, numel[, view_metadata])`` and are rebuilt by
   ``torch._utils._rebuild_tensor_v2``,
5. a list of the storage keys,

followed, per key in that list, by an 8-byte element count and the storage's raw bytes.

Unpickling runs with a restricted :class:`pickle.Unpickler` that resolves only the handful of
globals such a file needs, each to a harmless NumPy stand-in, so a malicious file cannot run
code; torch is never imported.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import pickle
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["RefusedGlobalError", "load_legacy_state_dict"]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
_ZIP_MAGIC = b"PK\x03\x04"


class RefusedGlobalError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list; nothing was imported or called."""


class _StorageType:
    """Stand-in for a ``torch.<X>Storage`` class: only remembers the element dtype."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: str) -> None:
        self.name = name
        # Byte order is applied later from the sys-info dict.
        self.dtype = np.dtype(dtype)

    def __reduce__(self) -> Any:  # pragma: no cover - never pickled
        raise TypeError("storage stand-ins are not picklable")

    def __repr__(self) -> str:
        return f"<torch.{self.name} stand-in ({self.dtype})>"


# bfloat16 has no NumPy dtype: it is read as its raw uint16 bits and widened to float32.
_STORAGE_TYPES: dict[str, _StorageType] = {
    name: _StorageType(name, dtype)
    for name, dtype in {
        "FloatStorage": "f4",
        "DoubleStorage": "f8",
        "HalfStorage": "f2",
        "BFloat16Storage": "u2",
        "LongStorage": "i8",
        "IntStorage": "i4",
        "ShortStorage": "i2",
        "CharStorage": "i1",
        "ByteStorage": "u1",
        "BoolStorage": "?",
    }.items()
}


class _StorageRef:
    """A storage named by a persistent id; its data arrives after the pickles."""

    __slots__ = ("data", "key", "numel", "offset", "root", "storage_type")

    def __init__(
        self,
        storage_type: _StorageType,
        key: str,
        numel: int,
        root: _StorageRef | None = None,
        offset: int = 0,
    ) -> None:
        self.storage_type = storage_type
        self.key = key
        self.numel = numel
        # Old files may reference a slice (view) of a root storage.
        self.root = root
        self.offset = offset
        self.data: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("BUILD on a storage is not allowed")

    def array(self) -> np.ndarray:
        """The storage's elements as a 1-D array (a view for storage views)."""
        if self.root is not None:
            return self.root.array()[self.offset : self.offset + self.numel]
        if self.data is None:
            raise ValueError(f"storage {self.key!r} has no data in the file")
        return self.data


class _PendingTensor:
    """A tensor whose storage bytes have not been read yet."""

    __slots__ = ("offset", "size", "storage", "stride")

    def __init__(
        self, storage: _StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
    ) -> None:
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("BUILD on a tensor is not allowed")

    def materialize(self) -> np.ndarray:
        """Copy the strided view out of the storage into an array that owns its memory."""
        flat = self.storage.array()
        if self.storage.storage_type.name == "BFloat16Storage":
            # bfloat16 is the upper half of a float32.
            flat = (flat.astype(np.uint32) << 16).view(np.float32)
        native = flat.dtype.newbyteorder("=")
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, dtype=native)
        # Bounds check first: as_strided would happily read past the buffer.
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if last >= flat.shape[0]:
            raise ValueError(
                f"tensor (offset {self.offset}, size {self.size}, stride {self.stride}) "
                f"overruns its storage {self.storage.key!r} of {flat.shape[0]} elements"
            )
        item = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.size,
            strides=tuple(s * item for s in self.stride),
            writeable=False,
        )
        return np.array(view, dtype=native, order="C", copy=True)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise pickle.UnpicklingError(f"tensor {what} must be a tuple of non-negative ints")
    return value


def _rebuild_tensor(
    storage: Any, storage_offset: Any, size: Any, stride: Any, *_rest: Any
) -> _PendingTensor:
    """Stand-in for ``torch._utils._rebuild_tensor[_v2]`` (requires_grad and hooks ignored)."""
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise pickle.UnpicklingError("tensor storage offset must be a non-negative int")
    size_t = _int_tuple(size, "size")
    stride_t = _int_tuple(stride, "stride")
    if len(size_t) != len(stride_t):
        raise pickle.UnpicklingError("tensor size and stride differ in length")
    return _PendingTensor(storage, storage_offset, size_t, stride_t)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    **{("torch", name): st for name, st in _STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals and ``'storage'`` persistent ids."""

    def __init__(self, file: BinaryIO, storages: dict[str, _StorageRef]) -> None:
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobalError(
                f"refused global {module}.{name}: not allowed in a legacy PyTorch state_dict"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        view_metadata = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"persistent id names no storage type: {storage_type!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage persistent id {pid!r:.80}")
        root = self._storages.get(key)
        if root is None:
            root = self._storages[key] = _StorageRef(storage_type, key, numel)
        elif root.storage_type is not storage_type or root.numel != numel:
            raise pickle.UnpicklingError(f"storage {key!r} declared twice with different types")
        if view_metadata is None:
            return root
        view_key, offset, view_size = view_metadata
        if not (
            isinstance(offset, int)
            and isinstance(view_size, int)
            and offset >= 0
            and view_size >= 0
            and offset + view_size <= numel
        ):
            raise pickle.UnpicklingError(f"storage view {view_key!r} out of range")
        return _StorageRef(storage_type, str(view_key), view_size, root=root, offset=offset)


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"truncated legacy PyTorch file while reading {what}")
    return data


def _load_pickle(f: BinaryIO, storages: dict[str, _StorageRef], what: str) -> Any:
    try:
        return _RestrictedUnpickler(f, storages).load()
    except RefusedGlobalError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
    ) as exc:
        raise ValueError(f"malformed legacy PyTorch file ({what}): {exc}") from exc


def _load_stream(f: BinaryIO) -> dict[str, np.ndarray]:
    # Peek at the first bytes without consuming them (read everything if we cannot seek).
    if f.seekable():
        start = f.tell()
        head = f.read(len(_ZIP_MAGIC))
        f.seek(start)
    else:
        f = io.BytesIO(f.read())
        head = f.getvalue()[: len(_ZIP_MAGIC)]
    if head == _ZIP_MAGIC:
        raise ValueError(
            "this is a zip-format (new-style torch.save) file, not the legacy pre-zip format; "
            "re-save it with torch.save(..., _use_new_zipfile_serialization=False)"
        )

    storages: dict[str, _StorageRef] = {}
    magic = _load_pickle(f, storages, "magic number")
    if magic != MAGIC_NUMBER:
        raise ValueError("not a legacy PyTorch file: bad magic number")
    protocol = _load_pickle(f, storages, "protocol version")
    if protocol != PROTOCOL_VERSION:
        raise ValueError(f"unsupported legacy PyTorch protocol version {protocol!r}")
    sys_info = _load_pickle(f, storages, "sys info")
    if not isinstance(sys_info, dict):
        raise ValueError("malformed legacy PyTorch file: sys info is not a dict")
    byte_order = "<" if sys_info.get("little_endian", True) else ">"

    result = _load_pickle(f, storages, "state_dict")
    keys = _load_pickle(f, storages, "storage keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError("malformed legacy PyTorch file: storage keys are not a list of str")

    for key in keys:
        ref = storages.get(key)
        if ref is None:
            raise ValueError(f"storage {key!r} listed in the file but never referenced")
        count = int.from_bytes(
            _read_exact(f, 8, f"size of storage {key!r}"), "little" if byte_order == "<" else "big"
        )
        if count != ref.numel:
            raise ValueError(f"storage {key!r} holds {count} elements, expected {ref.numel}")
        dtype = ref.storage_type.dtype.newbyteorder(byte_order)
        raw = _read_exact(f, count * dtype.itemsize, f"storage {key!r}")
        ref.data = np.frombuffer(raw, dtype=dtype)

    if not isinstance(result, Mapping):
        raise ValueError(f"legacy PyTorch file holds a {type(result).__name__}, not a state_dict")
    out: dict[str, np.ndarray] = {}
    for name, value in result.items():
        if not isinstance(name, str) or not isinstance(value, _PendingTensor):
            raise ValueError(f"state_dict entry {name!r} is not a tensor")
        out[name] = value.materialize()
    logger.debug("read %d tensors from %d storages", len(out), len(keys))
    return out


def load_legacy_state_dict(path: str | os.PathLike[str] | BinaryIO) -> dict[str, np.ndarray]:
    """Read a legacy (pre-zip) ``torch.save`` state_dict without torch.

    Args:
        path: a file path, or a binary file object positioned at the start of the data.

    Returns:
        ``{name: array}`` in file order. Each array owns its memory, is C-contiguous, native
        byte order, with the tensor's shape; dtypes follow the storages (FloatStorage ->
        float32, DoubleStorage -> float64, HalfStorage -> float16, LongStorage -> int64,
        IntStorage -> int32, ShortStorage -> int16, CharStorage -> int8, ByteStorage -> uint8,
        BoolStorage -> bool) except BFloat16Storage, which NumPy lacks and becomes float32.
        Zero-dim tensors (e.g. ``num_batches_tracked``) are 0-d arrays.

    Raises:
        ValueError: a zip-format file, a bad magic number, or a malformed/truncated file.
        RefusedGlobalError: (a ``pickle.UnpicklingError``) the pickle references a global
            outside the allow-list; nothing it names is ever imported or called.
    """
    if isinstance(path, (str, os.PathLike)):
        with open(path, "rb") as f:
            return _load_stream(f)
    return _load_stream(path)
