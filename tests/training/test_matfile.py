"""MAT-file reader: arrays written in the level-5 format (as MATLAB writes SVHN) read back exactly."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matv5 import write_mat

from densenet_debug.errors import UsageError
from densenet_debug.training.matfile import load_mat


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 2**16), compress=st.booleans(), big_endian=st.booleans(),
       narrow=st.booleans())
def test_round_trip_svhn_like(tmp_path_factory, n, seed, compress, big_endian, narrow):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.float64)
    path = tmp_path_factory.mktemp("mat") / "train_32x32.mat"
    write_mat(path, {"X": x, "y": y, "a_longer_name": np.arange(6.0).reshape(2, 3)}, compress=compress,
              big_endian=big_endian, stored={"y": "u1"} if narrow else None)
    arrays = load_mat(path)
    assert arrays["X"].dtype == np.uint8 and np.array_equal(arrays["X"], x)
    assert arrays["y"].dtype == np.float64 and np.array_equal(arrays["y"], y)  # class double, stored narrower
    assert np.array_equal(arrays["a_longer_name"], np.arange(6.0).reshape(2, 3))  # column-major order restored


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="scipy not installed (cross-check only)")
def test_reads_what_scipy_writes(tmp_path):
    import scipy.io

    x = np.random.default_rng(0).integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    for compress in (False, True):
        path = tmp_path / f"c{compress}.mat"
        scipy.io.savemat(path, {"X": x, "y": np.arange(1.0, 5.0)[:, None], "s": "text"}, do_compression=compress)
        arrays = load_mat(path)
        assert np.array_equal(arrays["X"], x) and arrays["y"].ravel().tolist() == [1, 2, 3, 4]
        assert "s" not in arrays  # strings are skipped, not misread


@pytest.mark.parametrize("content, message", [
    (b"short", "too short"),
    (b"not a mat file".ljust(200, b" "), "not a MATLAB level-5"),
    (b"MATLAB 7.3 MAT-file".ljust(200, b" "), "HDF5"),
])
def test_bad_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.mat"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        load_mat(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "t.mat"
    write_mat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UsageError, match="truncated"):
        load_mat(path)
