"""Shared test setup: the gpu marker skips with a reason when CUDA is absent."""

from __future__ import annotations

import pytest
import torch

from densenet_debug import build_model


def pytest_configure(config: pytest.Config) -> None:
    # The suite runs thousands of tiny ops; on 2 cores two OpenMP threads oversubscribe as soon as anything
    # else runs (CI, subprocess tests) and make small convs up to 100x slower. One thread is deterministic.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_model():
    """A 2-layers-per-block DenseNet-BC (k=4): every code path of BC-100 in milliseconds."""

    def make(seed: int = 0, **kwargs: object):
        torch.manual_seed(seed)
        return build_model("densenet-bc-16", **kwargs)

    return make


@pytest.fixture
def batch():
    def make(n: int = 4, seed: int = 0, classes: int = 10, shape: tuple[int, ...] = (3, 32, 32)):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)

    return make
