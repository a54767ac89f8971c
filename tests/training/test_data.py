"""Dataset readers on tiny files in the real formats, augmentation, and the epoch-indexed batch order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matv5 import write_mat

from densenet_debug.errors import UsageError
from densenet_debug.training.data import (
    STATS,
    ImageSet,
    augment,
    batches,
    load_dataset,
    normalize,
    num_batches,
    synthetic_dataset,
)


def _cifar_records(rng, n: int, label_bytes: int, classes: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """n records: label byte(s), then the R, G and B planes of a 32x32 image, each row-major."""
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, classes, (n, label_bytes), dtype=np.uint8)
    raw = b"".join(labels[i].tobytes() + images[i].tobytes() for i in range(n))
    return raw, images, labels[:, -1].astype(np.int64)


@settings(max_examples=6, deadline=None)
@given(counts=st.lists(st.integers(1, 3), min_size=6, max_size=6), seed=st.integers(0, 2**16),
       nested=st.booleans())
def test_cifar10_binary(tmp_path_factory, counts, seed, nested):
    rng = np.random.default_rng(seed)
    root = tmp_path_factory.mktemp("data")
    folder = root / "cifar-10-batches-bin" if nested else root
    folder.mkdir(exist_ok=True)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    parts = {}
    for name, n in zip(names, counts):
        raw, images, labels = _cifar_records(rng, n, 1, 10)
        (folder / name).write_bytes(raw)
        parts[name] = (images, labels)
    train = load_dataset("cifar10", root, "train")
    want_images = np.concatenate([parts[n][0] for n in names[:5]])
    assert train.images.dtype == torch.uint8 and train.images.shape == (sum(counts[:5]), 3, 32, 32)
    assert np.array_equal(train.images.numpy(), want_images)
    assert np.array_equal(train.labels.numpy(), np.concatenate([parts[n][1] for n in names[:5]]))
    test = load_dataset("cifar10", root, "test")
    assert np.array_equal(test.images.numpy(), parts["test_batch.bin"][0]) and test.num_classes == 10
    assert (train.mean, train.std) == STATS["cifar10"]


def test_cifar100_binary_uses_the_fine_label(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    for name, n in (("train.bin", 5), ("test.bin", 3)):
        raw, images, fine = _cifar_records(rng, n, 2, 100)
        (folder / name).write_bytes(raw)
    data = load_dataset("cifar100", tmp_path, "test")
    assert np.array_equal(data.images.numpy(), images) and np.array_equal(data.labels.numpy(), fine)
    assert data.num_classes == 100


def test_cifar_bad_size_and_label_range(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (folder / name).write_bytes(bytes(3073))
    (folder / "test_batch.bin").write_bytes(bytes(3074))
    with pytest.raises(UsageError, match="whole number of 3073-byte"):
        load_dataset("cifar10", tmp_path, "test")
    (folder / "test_batch.bin").write_bytes(bytes([11]) + bytes(3072))
    with pytest.raises(UsageError, match="labels span 11..11"):
        load_dataset("cifar10", tmp_path, "test")


@pytest.mark.parametrize("name, files", [
    ("cifar10", "data_batch_1.bin data_batch_2.bin data_batch_3.bin data_batch_4.bin data_batch_5.bin "
                "test_batch.bin"),
    ("cifar100", "train.bin test.bin"),
    ("svhn", "train_32x32.mat and test_32x32.mat"),
])
def test_missing_files_say_what_goes_where(tmp_path, name, files):
    with pytest.raises(UsageError) as err:
        load_dataset(name, tmp_path, "train")
    message = str(err.value)
    assert files in message and str(tmp_path) in message and "\n" not in message


@pytest.mark.parametrize("fmt", ["mat", "mat-compressed", "npz"])
def test_svhn(tmp_path, fmt):
    if fmt != "npz":
        pytest.importorskip("scipy.io", reason="scipy not installed: the [train] extra reads .mat files")
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (32, 32, 3, 6), dtype=np.uint8)
    y = np.array([[10], [1], [2], [9], [10], [5]], dtype=np.float64)  # 10 is the digit zero
    (tmp_path / "svhn").mkdir()
    if fmt == "npz":
        np.savez(tmp_path / "svhn" / "test_32x32.npz", X=x, y=y)
    else:
        write_mat(tmp_path / "svhn" / "test_32x32.mat", {"X": x, "y": y}, compress=fmt == "mat-compressed",
                  stored={"y": "u1"})
    data = load_dataset("svhn", tmp_path, "test")
    assert data.labels.tolist() == [0, 1, 2, 9, 0, 5]
    assert np.array_equal(data.images.numpy(), x.transpose(3, 2, 0, 1))  # (H, W, C, N) -> (N, C, H, W)


def test_svhn_npz_never_unpickles(tmp_path):
    (tmp_path / "svhn").mkdir()
    np.savez(tmp_path / "svhn" / "test_32x32.npz", X=np.array([object()], dtype=object), y=np.zeros(1))
    with pytest.raises(UsageError, match="pickle"):
        load_dataset("svhn", tmp_path, "test")


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 5), h=st.integers(1, 9), w=st.integers(1, 9), pad=st.integers(0, 4), seed=st.integers(0, 99),
       flip=st.booleans())
def test_augment_is_a_crop_of_the_padded_maybe_flipped_image(n, h, w, pad, seed, flip):
    images = torch.randint(1, 256, (n, 2, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    out = augment(images, torch.Generator().manual_seed(seed), padding=pad, flip=flip)
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = torch.nn.functional.pad(images, (pad,) * 4)
    for i in range(n):
        candidates = [padded[i, :, dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
        candidates += [c.flip(-1) for c in candidates] if flip else []
        assert any(torch.equal(out[i], c) for c in candidates)


def test_augment_without_padding_or_flip_is_identity():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(augment(images, torch.Generator().manual_seed(0), padding=0, flip=False), images)


def test_normalize():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(images, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    assert out.dtype == torch.float32
    assert torch.allclose(out[:, 0], torch.tensor(1.0)) and torch.allclose(out[:, 1], torch.tensor(3.0))
    assert torch.allclose(out[:, 2], torch.tensor(0.5))


def _indexed(n: int) -> ImageSet:
    """Label i for image i: the labels of a batch say which samples it holds."""
    return ImageSet("indexed", torch.zeros(n, 1, 4, 4, dtype=torch.uint8), torch.arange(n), n, (0.0,), (1.0,))


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 40), world=st.sampled_from([1, 2, 4]), per_rank=st.integers(1, 5), epoch=st.integers(0, 9),
       seed=st.integers(0, 99))
def test_batches_cover_the_epoch_once_across_ranks(n, world, per_rank, epoch, seed):
    data, batch = _indexed(n), per_rank * world
    seen = []
    for rank in range(world):
        ys = [y for _, y in batches(data, batch, train=True, epoch=epoch, seed=seed, rank=rank, world_size=world)]
        assert len(ys) == num_batches(n, batch, world_size=world)
        assert all(len(y) <= per_rank for y in ys)
        seen += torch.cat(ys).tolist()
    # DistributedSampler pads with repeats to a multiple of the world size: nothing missing, < world extra.
    assert set(seen) == set(range(n)) and len(seen) - n < world
    tests = [torch.cat([y for _, y in batches(data, batch, train=False, rank=r, world_size=world)]).tolist()
             for r in range(world) if r < n]
    assert sorted(sum(tests, [])) == list(range(n))  # test split: exactly once, no padding


def test_batches_are_a_function_of_seed_and_epoch():
    data = synthetic_dataset(64, (3, 8, 8), seed=3)

    def epoch(e: int, seed: int = 0):
        return [(x.clone(), y.clone()) for x, y in batches(data, 16, train=True, epoch=e, seed=seed)]

    a, b, c = epoch(2), epoch(2), epoch(3)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(a, c))
    assert len(list(batches(data, 16, train=True, limit=2))) == 2


def test_batch_size_must_split_over_processes():
    with pytest.raises(UsageError, match="not divisible by 4"):
        next(batches(_indexed(8), 6, train=True, world_size=4))


def test_synthetic_is_seeded_and_learnable():
    a, b = synthetic_dataset(200, (3, 8, 8), 4, seed=5), synthetic_dataset(200, (3, 8, 8), 4, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    means = torch.stack([a.images[a.labels == k].float().mean((0, 2, 3)) for k in range(4)])
    assert (means[:, None] - means[None]).abs().amax(-1).fill_diagonal_(99).min() > 5  # classes differ in colour
