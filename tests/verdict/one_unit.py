"""A small model around one unit under test, written as user code is (conv, the unit, conv, pool, linear), and
its data: shared by the tests of unit error models (sloped, selection, generic units)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class OneUnitNet(nn.Module):
    """``conv1 -> unit -> conv2 -> global average pool -> fc``; the unit is named ``unit`` in every report."""

    def __init__(self, unit: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.unit = unit
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.unit(self.conv1(x)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def data(seed: int) -> tuple[Tensor, Tensor]:
    """A batch of three 3x8x8 inputs and labels of four classes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 8, 8, generator=g), torch.randint(0, 4, (3,), generator=g)
