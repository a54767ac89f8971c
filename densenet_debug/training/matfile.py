"""Read the numeric arrays of a MATLAB level-5 MAT-file with numpy only (SVHN ships as such files).

Supports what SVHN's ``train_32x32.mat`` / ``test_32x32.mat`` use and a little more: little- or big-endian
files, compressed (``miCOMPRESSED``) and plain ``miMATRIX`` elements, real numeric classes, MATLAB's habit
of storing a double array in a narrower integer type. Cell arrays, structs, strings, sparse and complex
arrays are skipped. MAT 7.3 files are HDF5 and are refused with a hint. No pickle, no scipy.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

from densenet_debug.errors import UsageError

# Data types of elements (MAT-File Format, table 1-1): code -> numpy dtype without byte order.
_MI_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15
# Array classes (table 1-3) that hold real numbers, and the dtype MATLAB means by each.
_MX_NUMERIC = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_MX_COMPLEX_FLAG, _MX_SPARSE_CLASS = 0x0800, 5


def load_mat(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The real numeric variables of a level-5 MAT-file, by name, in MATLAB's (column-major) shape."""
    with open(path, "rb") as f:
        data = f.read()
    name = os.fspath(path)
    if len(data) < 128:
        raise UsageError(f"{name}: too short to be a MAT-file")
    if data[:10] == b"MATLAB 7.3" or data[512:520] == b"\x89HDF\r\n\x1a\n":
        raise UsageError(f"{name}: MAT 7.3 (HDF5) is not supported; save it with -v7 or as an npz")
    endian = {b"IM": "<", b"MI": ">"}.get(data[126:128])
    if endian is None or not data[:6] == b"MATLAB":
        raise UsageError(f"{name}: not a MATLAB level-5 MAT-file")
    out: dict[str, np.ndarray] = {}
    for var, array in _elements(memoryview(data)[128:], endian, name):
        out[var] = array
    return out


def _tag(buf: memoryview, pos: int, endian: str) -> tuple[int, int, int, int]:
    """(type, nbytes, data start, next element start); handles the 4-byte "small data element" form."""
    first, second = np.frombuffer(buf, dtype=f"{endian}u4", count=2, offset=pos)
    first, second = int(first), int(second)
    if first >> 16:  # small element: nbytes in the upper half, data in the tag's second word
        return first & 0xFFFF, first >> 16, pos + 4, pos + 8
    return first, second, pos + 8, pos + 8 + second + (-second % 8)


def _elements(buf: memoryview, endian: str, name: str):
    pos = 0
    while pos + 8 <= len(buf):
        mi_type, nbytes, start, nxt = _tag(buf, pos, endian)
        if start + nbytes > len(buf):
            raise UsageError(f"{name}: truncated MAT-file (element at byte {128 + pos} runs past the end)")
        if mi_type == _MI_COMPRESSED:
            try:
                inner = zlib.decompress(buf[start:start + nbytes])
            except zlib.error as exc:
                raise UsageError(f"{name}: corrupt compressed element at byte {128 + pos}: {exc}") from None
            yield from _elements(memoryview(inner), endian, name)
            nxt = start + nbytes  # compressed elements are not padded
        elif mi_type == _MI_MATRIX and nbytes:
            parsed = _matrix(buf[start:start + nbytes], endian, name)
            if parsed is not None:
                yield parsed
        pos = nxt


def _matrix(buf: memoryview, endian: str, name: str) -> tuple[str, np.ndarray] | None:
    subs = []
    pos = 0
    while pos + 8 <= len(buf) and len(subs) < 4:
        mi_type, nbytes, start, nxt = _tag(buf, pos, endian)
        subs.append((mi_type, buf[start:start + nbytes]))
        pos = nxt
    if len(subs) < 3:
        raise UsageError(f"{name}: malformed matrix element")
    flags = int(np.frombuffer(subs[0][1], dtype=f"{endian}u4", count=1)[0])
    mx_class = flags & 0xFF
    dims = tuple(int(d) for d in np.frombuffer(subs[1][1], dtype=f"{endian}i4"))
    var = bytes(subs[2][1]).decode("ascii", "replace")
    if mx_class not in _MX_NUMERIC or mx_class == _MX_SPARSE_CLASS or flags & _MX_COMPLEX_FLAG:
        return None
    count = int(np.prod(dims))
    if count == 0:
        return var, np.zeros(dims, dtype=_MX_NUMERIC[mx_class])
    if len(subs) < 4 or subs[3][0] not in _MI_TYPES:
        raise UsageError(f"{name}: variable {var!r} has no readable real part")
    stored = np.frombuffer(subs[3][1], dtype=f"{endian}{_MI_TYPES[subs[3][0]]}")
    if stored.size != count:
        raise UsageError(f"{name}: variable {var!r} holds {stored.size} values, its shape {dims} needs {count}")
    return var, stored.astype(_MX_NUMERIC[mx_class]).reshape(dims, order="F")
