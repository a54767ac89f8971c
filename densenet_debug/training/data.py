"""Image classification data for training: CIFAR-10/100 (binary), SVHN (.mat or .npz), synthetic; offline.

Everything is read with numpy into one uint8 tensor (N, C, H, W) in memory; nothing is downloaded and
nothing is unpickled (CIFAR's python pickles are deliberately not supported: use the *binary* version).
Batches come from :func:`batches`: a seeded, epoch-indexed order (``DistributedSampler``, so a resumed or
multi-process run sees exactly the order an uninterrupted single run would), augmentation written in torch
(random crop with zero padding + horizontal flip, one gather per batch), then per-dataset normalization.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from densenet_debug.errors import UsageError

DATASETS = ("cifar10", "cifar100", "svhn")

# Per-channel mean/std on the 0..1 scale, of each training set.
# cifar10: the seed's compute-cifar10-mean.py values (bamos train.py); cifar100/svhn: the same computation
# on those training sets, as published widely (gpleiss issue #68 quotes the cifar100 ones).
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)),
    "cifar100": ((0.50707516, 0.48654887, 0.44091784), (0.26733429, 0.25643846, 0.27615047)),
    "svhn": ((0.4376821, 0.4437697, 0.47280442), (0.19803012, 0.20101562, 0.19703614)),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10}

_CIFAR10_DIR, _CIFAR100_DIR = "cifar-10-batches-bin", "cifar-100-binary"
_CIFAR10_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
_CIFAR100_FILES = {"train": ["train.bin"], "test": ["test.bin"]}
_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 (N, C, H, W), int64 labels, and the normalization to apply."""

    name: str
    images: Tensor
    labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return int(self.labels.numel())


def load_dataset(name: str, root: str | os.PathLike, split: str) -> ImageSet:
    """``cifar10``/``cifar100``/``svhn`` ``train``/``test`` from ``root``; a missing file is a UsageError."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    root = Path(root)
    if name == "cifar10":
        images, labels = _read_cifar(_find(root, _CIFAR10_DIR, _CIFAR10_FILES, name, split), label_bytes=1)
    elif name == "cifar100":
        images, labels = _read_cifar(_find(root, _CIFAR100_DIR, _CIFAR100_FILES, name, split), label_bytes=2)
    else:
        images, labels = _read_svhn(root, split)
    mean, std = STATS[name]
    classes = NUM_CLASSES[name]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise UsageError(f"{name} {split}: labels span {int(labels.min())}..{int(labels.max())}, "
                         f"expected 0..{classes - 1}")
    return ImageSet(name, images, labels, classes, mean, std)


def require_dataset(name: str, root: str | os.PathLike) -> None:
    """Fail now, in one line, if a split's files are missing (before minutes of model building)."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    for split in ("train", "test"):
        if name == "cifar10":
            _find(Path(root), _CIFAR10_DIR, _CIFAR10_FILES, name, split)
        elif name == "cifar100":
            _find(Path(root), _CIFAR100_DIR, _CIFAR100_FILES, name, split)
        else:
            _svhn_path(Path(root), split)


def synthetic_dataset(n: int, shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10,
                      seed: int = 0) -> ImageSet:
    """Random images with a learnable signal: each class adds its own colour offset to uniform noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    palette = torch.randint(-48, 49, (num_classes, shape[0], 1, 1), generator=torch.Generator().manual_seed(1234))
    noise = torch.randint(64, 192, (n, *shape), generator=g)
    images = (noise + palette[labels]).clamp_(0, 255).to(torch.uint8)
    c = shape[0]
    return ImageSet("synthetic", images, labels, num_classes, (0.5,) * c, (0.25,) * c)


def _find(root: Path, sub: str, files: dict[str, list[str]], name: str, split: str) -> list[Path]:
    """The split's files under ``root/sub`` (or directly in ``root``); else one line saying what goes where."""
    for where in (root / sub, root):
        paths = [where / f for f in files[split]]
        if all(p.is_file() for p in paths):
            return paths
    wanted = " ".join(files["train"] + files["test"])
    raise UsageError(f"{name} {split} data not found: put {wanted} (the binary version from "
                     f"https://www.cs.toronto.edu/~kriz/cifar.html) in {root / sub}/")


def _read_cifar(paths: list[Path], label_bytes: int) -> tuple[Tensor, Tensor]:
    """CIFAR binary records: label byte(s) then 3072 pixels (R, G, B planes of 32x32, row-major).

    CIFAR-100 records carry the coarse label then the fine one; we train on the fine (last) label.
    """
    record = label_bytes + _PIXELS
    chunks = []
    for path in paths:
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % record:
            raise UsageError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records "
                             f"(is it the binary version of this dataset?)")
        chunks.append(raw.reshape(-1, record))
    rows = np.concatenate(chunks)
    labels = torch.from_numpy(rows[:, label_bytes - 1].astype(np.int64))
    images = torch.from_numpy(np.ascontiguousarray(rows[:, label_bytes:]).reshape(-1, 3, 32, 32))
    return images, labels


def _svhn_path(root: Path, split: str) -> Path:
    candidates = [root / "svhn" / f"{split}_32x32.{ext}" for ext in ("mat", "npz")]
    candidates += [root / f"{split}_32x32.{ext}" for ext in ("mat", "npz")]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise UsageError(f"svhn {split} data not found: put train_32x32.mat and test_32x32.mat (format 2 from "
                         f"http://ufldl.stanford.edu/housenumbers/), or the same arrays X, y as .npz, "
                         f"in {root / 'svhn'}/")
    return path


def _read_svhn(root: Path, split: str) -> tuple[Tensor, Tensor]:
    """SVHN format 2: ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) with labels 1..10, where 10 means digit 0.

    Read from ``{split}_32x32.mat`` or the same arrays saved as ``{split}_32x32.npz`` (loaded without pickle).
    """
    path = _svhn_path(root, split)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k in ("X", "y")}
        except ValueError as exc:  # object arrays need pickle, which we refuse
            raise UsageError(f"{path}: {exc}") from None
    else:
        arrays = _load_mat(path)
    if "X" not in arrays or "y" not in arrays:
        raise UsageError(f"{path}: expected arrays X and y, found {', '.join(sorted(arrays)) or 'none'}")
    x, y = arrays["X"], arrays["y"].reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.size:
        raise UsageError(f"{path}: X must be (32, 32, 3, N) with N = len(y), got X {x.shape} and {y.size} labels")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8, copy=False))
    labels = torch.from_numpy(y.astype(np.int64) % 10)  # 10 -> 0 (digit zero), 1..9 unchanged
    return images, labels


def _load_mat(path: Path) -> dict[str, np.ndarray]:
    """``X`` and ``y`` of a MATLAB (level 5, v4/v6/v7) file, read by ``scipy.io.loadmat`` (no pickle, no code).

    scipy is an optional extra of the training install (``densenet-debug[train]``); without it a .mat file
    is a one-line error that also names the npz alternative.
    """
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UsageError(f"reading {path} needs scipy: pip install 'densenet-debug[train]' (or save X and y as "
                         f"{path.with_suffix('.npz').name})") from None
    try:
        return loadmat(path, variable_names=("X", "y"))
    except NotImplementedError:  # scipy's answer to a v7.3 file, which is HDF5
        raise UsageError(f"{path}: MAT 7.3 (HDF5) is not supported; save it with -v7 or as an npz") from None
    except Exception as exc:  # a user's file: truncated, not a MAT-file, a corrupt stream
        raise UsageError(f"{path}: not a readable MAT-file ({type(exc).__name__}: {exc})") from None


def augment(images: Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True) -> Tensor:
    """Random crop of the original size from the zero-padded image, then a random horizontal flip.

    As in the seed (torchvision RandomCrop(32, padding=4) + RandomHorizontalFlip before Normalize), the pad is
    black, not the mean colour (Lua normalizes first). One gather for the whole batch, any dtype/device.
    """
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator).to(images.device)
    mirror = (torch.rand(n, 1, generator=generator) < 0.5).to(images.device) if flip else None
    rows = dy + torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device).expand(n, w)
    if mirror is not None:
        cols = torch.where(mirror, w - 1 - cols, cols)
    cols = dx + cols
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    chan = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (N, C, H, W) -> float32 (x/255 - mean) / std."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def num_batches(n: int, batch_size: int, limit: int | None = None, world_size: int = 1) -> int:
    per_rank = -(-n // world_size)
    count = -(-per_rank // (batch_size // world_size))
    return count if limit is None else min(count, limit)


def batches(
    data: ImageSet, batch_size: int, *, train: bool, epoch: int = 0, seed: int = 0, rank: int = 0,
    world_size: int = 1, limit: int | None = None, device: torch.device | str = "cpu",
) -> Iterator[tuple[Tensor, Tensor]]:
    """Normalized (x, y) batches of this rank's share of ``batch_size`` (the global batch).

    Training: a shuffled order fixed by (seed, epoch) that ``DistributedSampler`` splits among ranks, and
    augmentation seeded by (seed, epoch, rank), so every epoch is reproducible from its number alone (resume
    needs no sampler state). Test: the data in order, rank r taking every world_size-th sample, no padding.
    """
    if batch_size % world_size:
        raise UsageError(f"batch size {batch_size} is not divisible by {world_size} processes")
    local = batch_size // world_size
    if train:
        sampler = DistributedSampler(range(len(data)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7919 + rank)
    else:
        order = torch.arange(rank, len(data), world_size)
        g = None
    for i, start in enumerate(range(0, len(order), local)):
        if limit is not None and i >= limit:
            return
        idx = order[start:start + local]
        images = data.images[idx]
        if train:
            images = augment(images, g)
        x = normalize(images.to(device, non_blocking=True), data.mean, data.std)
        yield x, data.labels[idx].to(device, non_blocking=True)
