"""Scalars that a narrow dtype cannot hold. A leaky ReLU module as a unit: its negative branch multiplies by the
slope, so it rounds (twice in float32: the slope's cast and the product). Judged as an exact op it was a false
alarm on every correct backend ("error 4.1e-09 > tolerance 0"). Code between units that multiplies by 0.1 (or
clamps to 0.1, or takes leaky ReLU's default slope): counted as one rounding where float32 does two, a false
alarm on 6 seeds out of 6 ("conv2 (forward input, between): error 4.67e-08 > tolerance 3.9e-08"). Judged to
those roundings both agree, and a scalar wrong by 2^-12 in float32 is still found where it is."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from densenet_debug.verdict.between import inexact_scalars
from densenet_debug.verdict.engine import diff
from tests.verdict.one_unit import OneUnitNet, data


class _WrongSlopeInFloat32(nn.LeakyReLU):
    """A kernel bug: float32 uses a slope off by 2^-12 (relative); float64 is right."""

    def forward(self, x: Tensor) -> Tensor:
        slope = self.negative_slope * (1 + 2**-12) if x.dtype == torch.float32 else self.negative_slope
        return F.leaky_relu(x, slope, self.inplace)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), slope=st.sampled_from([0.01, 0.2, 1 / 3, 0.5, 1.7]),
       inplace=st.booleans(), pair=st.sampled_from([("mkldnn", "native"), ("native", "fp64")]))
def test_correct_leaky_relu_units_agree(seed: int, slope: float, inplace: bool, pair: tuple[str, str]) -> None:
    torch.manual_seed(seed)
    model = OneUnitNet(nn.LeakyReLU(slope, inplace=inplace))
    report = diff(model, *data(seed), *pair)
    assert report.verdict == "agree", report.summary
    rows = [r for r in report.rows if r.layer == "unit" and r.mode == "local"]
    assert {r.quantity for r in rows} >= {"output", "grad_input"} and all(r.tolerance > 0 for r in rows)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_slope_wrong_in_float32_is_found_at_the_unit(inplace: bool) -> None:
    torch.manual_seed(0)
    model = OneUnitNet(_WrongSlopeInFloat32(0.2, inplace=inplace))
    report = diff(model, *data(0), "mkldnn", "native")
    assert report.verdict == "mismatch"
    assert report.first_divergence is not None and report.first_divergence["layer"] == "unit", report.summary


class _ScaledBetween(nn.Module):
    """Scalars in the code between units, as user code writes them (residual scaling, a clamp, a leaky ReLU)."""

    def __init__(self, wrong: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        self.wrong = wrong

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(x)
        scale = 0.1 * (1 + 2**-12) if self.wrong and h.dtype == torch.float32 else 0.1
        out = self.conv2(torch.clamp(F.leaky_relu(h * scale), -0.3, 0.7) + 0.2)
        return self.fc(F.adaptive_avg_pool2d(F.leaky_relu(out, 0.2), 1).flatten(1))


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_inexact_scalars_between_units_agree(seed: int) -> None:
    torch.manual_seed(seed)
    report = diff(_ScaledBetween(), *data(seed), "mkldnn", "native")
    assert report.verdict == "agree", report.summary


def test_a_scalar_wrong_in_float32_between_units_is_found_there() -> None:
    torch.manual_seed(0)
    report = diff(_ScaledBetween(wrong=True), *data(0), "mkldnn", "native")
    assert report.verdict == "mismatch", report.summary
    first = report.first_divergence
    assert first is not None and first["layer"] == "conv2" and first["mode"] == "between", report.summary


def test_inexact_scalars_counts_given_and_default_scalars() -> None:
    x = torch.ones(2)
    aten = torch.ops.aten
    assert inexact_scalars(aten.mul.Tensor, (x, 0.1), {}) == 1  # a wrapped number where a Tensor goes
    assert inexact_scalars(aten.mul.Tensor, (x, 0.5), {}) == 0  # a power of two: held exactly
    assert inexact_scalars(aten.div.Tensor, (x, 3), {}) == 0
    assert inexact_scalars(aten.leaky_relu.default, (x,), {}) == 1  # the schema's default slope, 0.01
    assert inexact_scalars(aten.clamp.default, (x, 0.1, 0.5), {}) == 1
    assert inexact_scalars(aten.clamp.default, (x,), {"min": 0.3, "max": 0.7}) == 2
    assert inexact_scalars(aten.add.Tensor, (x, x), {"alpha": 1}) == 0
    assert inexact_scalars(aten.mul.Tensor, (x, 257), {}) == 1  # an integer bfloat16 cannot hold
