"""SVHN's MAT-files, read with ``scipy.io.loadmat``: what MATLAB writes (our own writer, ``matv5``, built
from the published format, not from scipy) reads back exactly; a bad file or a missing scipy is one line."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matv5 import write_mat

from densenet_debug.errors import UsageError
from densenet_debug.training.data import load_dataset

needs_scipy = pytest.mark.skipif(importlib.util.find_spec("scipy") is None,
                                 reason="scipy not installed: the [train] extra reads .mat files")


def _svhn_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "svhn").mkdir()
    return root


@needs_scipy
@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 2**16), compress=st.booleans(), big_endian=st.booleans(),
       narrow=st.booleans())
def test_round_trip_svhn_like(tmp_path_factory, n, seed, compress, big_endian, narrow):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.float64)  # SVHN's labels: 1..10, 10 is the digit zero
    root = _svhn_dir(tmp_path_factory)
    write_mat(root / "svhn" / "train_32x32.mat", {"X": x, "y": y, "a_longer_name": np.arange(6.0).reshape(2, 3)},
              compress=compress, big_endian=big_endian, stored={"y": "u1"} if narrow else None)
    data = load_dataset("svhn", root, "train")
    assert np.array_equal(data.images.numpy(), x.transpose(3, 2, 0, 1))  # (H, W, C, N) -> (N, C, H, W)
    assert data.labels.tolist() == (y.ravel().astype(int) % 10).tolist()


@needs_scipy
@pytest.mark.parametrize("content, message", [
    (b"", "not a readable MAT-file"),
    (b"not a mat file".ljust(200, b" "), "not a readable MAT-file"),
    # A v7.3 header (version 0x0200, little-endian): the file is HDF5, which loadmat does not read.
    (b"MATLAB 7.3 MAT-file".ljust(124, b" ") + b"\x00\x02IM" + b"\0" * 400, "MAT 7.3 (HDF5) is not supported"),
])
def test_bad_files_are_one_line_errors(tmp_path, content, message):
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(content)
    with pytest.raises(UsageError, match=re.escape(message)) as err:
        load_dataset("svhn", tmp_path, "test")
    assert "\n" not in str(err.value)


@needs_scipy
def test_truncated_file(tmp_path):
    (tmp_path / "svhn").mkdir()
    path = tmp_path / "svhn" / "test_32x32.mat"
    write_mat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1))})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UsageError, match="not a readable MAT-file"):
        load_dataset("svhn", tmp_path, "test")


def test_without_scipy_a_mat_file_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    (tmp_path / "svhn").mkdir()
    write_mat(tmp_path / "svhn" / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 1), np.uint8), "y": np.ones((1, 1))})
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # `from scipy.io import ...` now raises ImportError
    with pytest.raises(UsageError, match=r"needs scipy: pip install 'densenet-debug\[train\]'.*test_32x32.npz"):
        load_dataset("svhn", tmp_path, "test")
