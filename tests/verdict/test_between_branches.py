"""The between check's magnitudes take the branches the values took (verdict.magnitude.Branches).

A max-pool, clamp, leaky ReLU or ``where`` in the code between units decides on signs and orders that
magnitudes do not keep: evaluated on |values| the pool picks another pixel, and the bound where the real
gradient flows was 0 (a false alarm on every correct backend, tolerance ~1e-42).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from densenet_debug.verdict.engine import diff
from densenet_debug.verdict.magnitude import Branches, MagnitudeMode


class _Record(TorchDispatchMode):
    def __init__(self, branches: Branches) -> None:
        super().__init__()
        self.branches = branches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        return self.branches.run(func, args, kwargs or {})


def _piecewise(x: Tensor, w: Tensor) -> Tensor:
    p = F.max_pool2d(torch.relu(x), 3, 2, 1)
    h = F.leaky_relu(torch.clamp(p * w, -1.0, 0.5), 0.1)
    h = torch.where(h > 0.25, h, 0.5 * h)
    return torch.maximum(h, F.hardtanh(p, -0.3, 0.2)) + F.threshold(p, 0.1, -2.0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 3), hw=st.integers(2, 7))
def test_magnitudes_bound_the_values_forward_and_backward(seed: int, n: int, hw: int) -> None:
    """With the values' branches, every output and gradient magnitude is at least the value's own size."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, hw, hw, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 2, 1, 1, generator=g, dtype=torch.float64)
    v = torch.randn(_piecewise(x, w).shape, generator=g, dtype=torch.float64)
    branches = Branches()
    with _Record(branches):
        y = _piecewise(x, w)
        (gx,) = torch.autograd.grad(y, x, v)
    xm = x.detach().abs().requires_grad_(True)
    with MagnitudeMode(branches=branches):
        ym = _piecewise(xm, w.abs())
        (gm,) = torch.autograd.grad(ym, xm, v.abs())
    assert branches.drift == 0
    tiny = 1e-12
    assert bool((ym >= y.detach().abs() - tiny).all())
    assert bool((gm >= gx.abs() - tiny).all())


class _PoolResidual(nn.Module):
    """A functional max-pool between units, its output used twice (a unit and a residual sum)."""

    def __init__(self, fancy: bool) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.fancy = fancy

    def forward(self, x: Tensor) -> Tensor:
        if not self.fancy:
            p = F.max_pool2d(F.relu(self.bn0(self.conv0(x))), 2)
            h = self.bn1(self.conv1(p)) + p
        else:
            p = F.max_pool2d(F.relu(self.bn0(self.conv0(x))), 3, 2, 1)
            h = F.leaky_relu(torch.clamp(self.bn1(self.conv1(p)), -1, 1), 0.1)
            h = torch.where(h > 0.5, h, 0.5 * h) + p
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class _ScaleInFloat32(torch.autograd.Function):
    """Identity forward; the backward scales channel 1 of the gradient, in float32 only."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # noqa: ANN001
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # noqa: ANN001
        if g.dtype != torch.float32:
            return g
        g = g.clone()
        g[:, 1] *= 1.01
        return g


class _FaultyPoolResidual(_PoolResidual):
    def forward(self, x: Tensor) -> Tensor:
        p = _ScaleInFloat32.apply(F.max_pool2d(F.relu(self.bn0(self.conv0(x))), 2))
        h = self.bn1(self.conv1(p)) + p
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _data(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), fancy=st.booleans(), pair=st.sampled_from([("native", "fp64"),
                                                                              ("mkldnn", "native")]))
def test_piecewise_code_between_units_agrees_on_correct_backends(seed: int, fancy: bool, pair: tuple) -> None:
    torch.manual_seed(seed)
    report = diff(_PoolResidual(fancy), *_data(seed), *pair)
    between = [r for r in report.rows if r.mode == "between"]
    assert between and report.verdict == "agree", [(r.layer, r.quantity, r.error_a, r.tolerance)
                                                    for r in between if str(r.status) != "ok"]


def test_a_wrong_gradient_through_the_pool_is_still_a_between_finding() -> None:
    torch.manual_seed(0)
    report = diff(_FaultyPoolResidual(False), *_data(0), "native", "fp64")
    assert report.verdict == "mismatch"
    failing = [r for r in report.rows if r.mode == "between" and str(r.status) != "ok"]
    assert any(r.layer == "bn0" and r.quantity == "grad_output" for r in failing), failing
