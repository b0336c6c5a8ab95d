"""Tests for the torch-free reader of legacy (pre-zip) PyTorch state_dicts.

The files are written here by hand, byte for byte, in the legacy framing: no torch needed.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from semclust.embed.backbones.torch_legacy import RefusedGlobalError, load_legacy_state_dict

MAGIC = 0x1950A86A20F9469CFC6C
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}
STORAGE_DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "<i1",
    "ByteStorage": "<u1",
    "BoolStorage": "?",
    "BFloat16Storage": "<u2",
}


def _frag(value: object) -> bytes:
    """Opcodes for a plain value: a protocol-2 pickle less its PROTO header, PUTs and STOP."""
    return pickletools.optimize(pickle.dumps(value, protocol=2))[2:-1]


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _tensor(storage_type: str, key: str, numel: int, offset: int, size, stride, view=None) -> bytes:
    """Opcodes for ``_rebuild_tensor_v2(<storage pid>, offset, size, stride, False, {})``."""
    pid = (
        b"("
        + _frag("storage")
        + _global("torch", storage_type)
        + _frag(key)
        + _frag("cpu")
        + _frag(numel)
        + (b"N" if view is None else _frag(view))  # view_metadata
        + b"tQ"  # TUPLE, BINPERSID
    )
    args = (
        b"("
        + pid
        + _frag(offset)
        + _frag(tuple(size))
        + _frag(tuple(stride))
        + b"\x89"  # requires_grad False
        + _global("collections", "OrderedDict")
        + b")R"  # backward_hooks = OrderedDict()
        + b"t"
    )
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _legacy_file(
    tensors: dict[str, tuple[str, str, int, tuple, tuple]],
    storages: dict[str, tuple[str, np.ndarray]],
    key_order: list[str] | None = None,
) -> bytes:
    """A legacy torch.save file.

    tensors: name -> (storage type, storage key, offset, size, stride);
    storages: key -> (storage type, 1-D data).
    """
    body = _global("collections", "OrderedDict") + b")R("
    for name, (stype, key, offset, size, stride) in tensors.items():
        numel = storages[key][1].size
        body += _frag(name) + _tensor(stype, key, numel, offset, size, stride)
    state = b"\x80\x02" + body + b"u."
    keys = key_order if key_order is not None else list(storages)
    out = pickle.dumps(MAGIC, 2) + pickle.dumps(1001, 2) + pickle.dumps(SYS_INFO, 2)
    out += state + pickle.dumps(keys, 2)
    for key in keys:
        stype, data = storages[key]
        out += struct.pack("<q", data.size) + data.astype(STORAGE_DTYPES[stype]).tobytes()
    return out


def _framed(state_pickle: bytes, keys: list[str] | None = None) -> bytes:
    """The legacy framing around an arbitrary state pickle."""
    return (
        pickle.dumps(MAGIC, 2)
        + pickle.dumps(1001, 2)
        + pickle.dumps(SYS_INFO, 2)
        + state_pickle
        + pickle.dumps(keys or [], 2)
    )


@pytest.fixture(scope="module")
def sample() -> tuple[bytes, dict[str, np.ndarray]]:
    """A hand-built file and the exact arrays it must decode to."""
    s_float = np.arange(12, dtype=np.float32) * 0.5 - 2.0
    s_view = np.linspace(-1.0, 1.0, 10, dtype=np.float32)
    s_double = np.array([np.pi, -np.e, 1e300], dtype=np.float64)
    s_half = np.array([0.5, -1.25, 65504.0], dtype=np.float16)
    s_long = np.array([7, -(2**40)], dtype=np.int64)
    s_int = np.array([1, -2, 3, 2**31 - 1], dtype=np.int32)
    s_short = np.array([-32768, 5], dtype=np.int16)
    s_char = np.array([-128, 127, 0], dtype=np.int8)
    s_byte = np.array([0, 255, 9], dtype=np.uint8)
    s_bool = np.array([True, False, True])
    # bfloat16 bit patterns: 1.5, -2.0, 0.15625 and 2**127.
    s_bf16 = np.array([0x3FC0, 0xC000, 0x3E20, 0x7F00], dtype=np.uint16)
    bf16 = np.array([1.5, -2.0, 0.15625, 2.0**127], dtype=np.float32)

    storages = {
        "10": ("FloatStorage", s_float),
        "11": ("FloatStorage", s_view),
        "12": ("DoubleStorage", s_double),
        "13": ("HalfStorage", s_half),
        "14": ("LongStorage", s_long),
        "15": ("IntStorage", s_int),
        "16": ("ShortStorage", s_short),
        "17": ("CharStorage", s_char),
        "18": ("ByteStorage", s_byte),
        "19": ("BoolStorage", s_bool),
        "20": ("BFloat16Storage", s_bf16),
    }
    tensors = {
        "conv.weight": ("FloatStorage", "10", 0, (2, 3), (3, 1)),
        # Same storage again, non-zero offset and a stride of 2.
        "conv.strided": ("FloatStorage", "10", 5, (3,), (2,)),
        # Transposed (column-major) view of a whole storage.
        "fc.weight_t": ("FloatStorage", "10", 0, (4, 3), (1, 4)),
        "bn.bias": ("FloatStorage", "11", 4, (3,), (1,)),
        # Offset + non-contiguous 2-D slice.
        "bn.block": ("FloatStorage", "11", 1, (2, 2), (4, 2)),
        "d": ("DoubleStorage", "12", 0, (3,), (1,)),
        "h": ("HalfStorage", "13", 1, (2,), (1,)),
        "bn.num_batches_tracked": ("LongStorage", "14", 1, (), ()),
        "i": ("IntStorage", "15", 0, (2, 2), (2, 1)),
        "s": ("ShortStorage", "16", 0, (2,), (1,)),
        "c": ("CharStorage", "17", 0, (3,), (1,)),
        "u": ("ByteStorage", "18", 0, (3,), (1,)),
        "b": ("BoolStorage", "19", 0, (3,), (1,)),
        "bf": ("BFloat16Storage", "20", 0, (2, 2), (2, 1)),
        "empty": ("FloatStorage", "11", 0, (0, 3), (3, 1)),
    }
    expected = {
        "conv.weight": s_float[:6].reshape(2, 3),
        "conv.strided": s_float[5:11:2],
        "fc.weight_t": s_float.reshape(3, 4).T,
        "bn.bias": s_view[4:7],
        "bn.block": np.array([[s_view[1], s_view[3]], [s_view[5], s_view[7]]]),
        "d": s_double,
        "h": s_half[1:],
        "bn.num_batches_tracked": np.array(-(2**40), dtype=np.int64),
        "i": s_int.reshape(2, 2),
        "s": s_short,
        "c": s_char,
        "u": s_byte,
        "b": s_bool,
        "bf": bf16.reshape(2, 2),
        "empty": np.zeros((0, 3), np.float32),
    }
    # Storage data follows in the key list's order, not the order of first reference.
    key_order = sorted(storages, reverse=True)
    return _legacy_file(tensors, storages, key_order), expected


def _check(result: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(result) == list(expected)
    for name, want in expected.items():
        got = result[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert got.flags.owndata and got.flags.c_contiguous and got.flags.writeable, name


def test_round_trip_from_path(tmp_path: Path, sample) -> None:
    data, expected = sample
    path = tmp_path / "sd.pth"
    path.write_bytes(data)
    _check(load_legacy_state_dict(path), expected)
    _check(load_legacy_state_dict(str(path)), expected)


def test_round_trip_from_file_objects(sample) -> None:
    data, expected = sample
    _check(load_legacy_state_dict(io.BytesIO(data)), expected)

    class Unseekable(io.RawIOBase):
        def __init__(self, raw: bytes) -> None:
            self._buf = io.BytesIO(raw)

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            return self._buf.readinto(b)

    _check(load_legacy_state_dict(io.BufferedReader(Unseekable(data))), expected)


def test_results_do_not_alias_each_other(sample) -> None:
    data, _ = sample
    sd = load_legacy_state_dict(io.BytesIO(data))
    before = sd["conv.strided"].copy()
    sd["conv.weight"][...] = 0  # shares a storage with conv.strided in the file
    np.testing.assert_array_equal(sd["conv.strided"], before)


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_refuses_os_system_and_never_runs_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": _Evil(f"touch {marker}")}, protocol=2)
    path = tmp_path / "evil.pth"
    path.write_bytes(_framed(payload))
    with pytest.raises(pickle.UnpicklingError, match=rf"refused global {os.system.__module__}"):
        load_legacy_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("os", "system"),
        ("builtins", "eval"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch", "load"),
        ("collections", "defaultdict"),
    ],
)
def test_refuses_any_other_global(module: str, name: str) -> None:
    state = b"\x80\x02" + _global(module, name) + _frag(("echo hi",)) + b"R."
    with pytest.raises(RefusedGlobalError, match=rf"refused global {module}\.{name}"):
        load_legacy_state_dict(io.BytesIO(_framed(state)))
    # Also refused where the magic number should be.
    with pytest.raises(pickle.UnpicklingError, match="refused global"):
        load_legacy_state_dict(io.BytesIO(state))


def test_zip_format_is_rejected_clearly(tmp_path: Path) -> None:
    path = tmp_path / "new_style.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(ValueError, match=r"zip-format.*not the legacy"):
        load_legacy_state_dict(path)


def test_bad_magic_number() -> None:
    data = pickle.dumps(12345, 2) + pickle.dumps(1001, 2)
    with pytest.raises(ValueError, match="magic number"):
        load_legacy_state_dict(io.BytesIO(data))


def test_garbage_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="legacy PyTorch"):
        load_legacy_state_dict(io.BytesIO(b"\x00\x01not a pickle at all"))


def test_truncated_storage_data(sample) -> None:
    data, _ = sample
    with pytest.raises(ValueError, match="truncated"):
        load_legacy_state_dict(io.BytesIO(data[:-3]))


def test_tensor_overrunning_its_storage() -> None:
    storages = {"0": ("FloatStorage", np.zeros(6, np.float32))}
    tensors = {"w": ("FloatStorage", "0", 2, (2, 3), (3, 1))}
    with pytest.raises(ValueError, match="overruns its storage"):
        load_legacy_state_dict(io.BytesIO(_legacy_file(tensors, storages)))


def test_old_style_storage_view() -> None:
    # Pre-1.0 files point a tensor at (view key, offset, size) inside a root storage.
    root = np.arange(8, dtype=np.float32)
    state = (
        b"\x80\x02"
        + _global("collections", "OrderedDict")
        + b")R("
        + _frag("v")
        + _tensor("FloatStorage", "0", 8, 1, (2,), (2,), view=("0_view", 3, 4))
        + b"u."
    )
    data = _framed(state, ["0"]) + struct.pack("<q", 8) + root.tobytes()
    sd = load_legacy_state_dict(io.BytesIO(data))
    np.testing.assert_array_equal(sd["v"], np.array([4.0, 6.0], np.float32))


def test_storage_count_must_match_declaration() -> None:
    storages = {"0": ("FloatStorage", np.zeros(4, np.float32))}
    data = bytearray(_legacy_file({"w": ("FloatStorage", "0", 0, (4,), (1,))}, storages))
    count_at = len(data) - 4 * 4 - 8
    data[count_at : count_at + 8] = struct.pack("<q", 3)
    with pytest.raises(ValueError, match="holds 3 elements, expected 4"):
        load_legacy_state_dict(io.BytesIO(bytes(data)))
