"""A minimal MATLAB level-5 MAT-file writer for tests, written from the published format description.

It writes what MATLAB itself writes for SVHN-like files: short names as "small data elements", data stored in
a narrower type than the array class (MATLAB saves a double array of small integers as uint8), optional
zlib compression (miCOMPRESSED) and either byte order.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_MI = {"i1": 1, "u1": 2, "i2": 3, "u2": 4, "i4": 5, "u4": 6, "f4": 7, "f8": 9, "i8": 12, "u8": 13}
_MX = {"f8": 6, "f4": 7, "i1": 8, "u1": 9, "i2": 10, "u2": 11, "i4": 12, "u4": 13, "i8": 14, "u8": 15}


def _element(mi_type: int, payload: bytes, e: str) -> bytes:
    if len(payload) <= 4:  # small data element: nbytes in the upper half of the first word
        return struct.pack(f"{e}I", (len(payload) << 16) | mi_type) + payload.ljust(4, b"\0")
    return struct.pack(f"{e}II", mi_type, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def _matrix(name: str, array: np.ndarray, e: str, stored: str | None) -> bytes:
    kind = array.dtype.str[1:]
    flags = _element(6, struct.pack(f"{e}II", _MX[kind], 0), e)
    dims = _element(5, np.asarray(array.shape or (1, 1), dtype=f"{e}i4").tobytes(), e)
    data_type = stored or kind
    data = np.asarray(array, dtype=f"{e}{data_type}").ravel(order="F").tobytes()
    body = flags + dims + _element(1, name.encode(), e) + _element(_MI[data_type], data, e)
    return struct.pack(f"{e}II", 14, len(body)) + body


def write_mat(path, arrays: dict[str, np.ndarray], *, compress: bool = False, big_endian: bool = False,
              stored: dict[str, str] | None = None) -> None:
    e = ">" if big_endian else "<"
    header = b"MATLAB 5.0 MAT-file, written by densenet-debug tests".ljust(116, b" ") + b"\0" * 8
    header += struct.pack(f"{e}H", 0x0100) + (b"MI" if big_endian else b"IM")
    out = [header]
    for name, array in arrays.items():
        element = _matrix(name, np.asarray(array), e, (stored or {}).get(name))
        if compress:
            packed = zlib.compress(element)
            element = struct.pack(f"{e}II", 15, len(packed)) + packed
        out.append(element)
    with open(path, "wb") as f:
        f.write(b"".join(out))
