"""Units that only select and move values (cat, ReLU, clamp, threshold, flatten) must equal themselves evaluated
on the side's own rounded operands. That evaluation now runs first in the operands' own dtype, bit for bit,
which is the same number for such ops in half the bytes, and is what "exact" asks of a clamp or threshold whose
value the dtype cannot hold (their float32 0.1 is the side's 0.1, not float64's: judged in float64, every correct
backend failed there against a tolerance of 0). A wrong selection is still found at its unit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from densenet_debug.verdict.engine import diff
from tests.verdict.one_unit import OneUnitNet, data

ACTS = {
    "hardtanh": lambda: nn.Hardtanh(-0.3, 0.7),
    "threshold": lambda: nn.Threshold(0.1, 0.1),
    "relu6": lambda: nn.ReLU6(),
    "relu_inplace": lambda: nn.ReLU(inplace=True),
}


class _WrongInFloat32(nn.Hardtanh):
    """A kernel bug: in float32 the upper bound is off by one ulp of 0.7."""

    def forward(self, x: Tensor) -> Tensor:
        hi = float(torch.tensor(self.max_val, dtype=torch.float32).nextafter(torch.tensor(1.0))) \
            if x.dtype == torch.float32 else self.max_val
        return F.hardtanh(x, self.min_val, hi)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(sorted(ACTS)))
def test_correct_selection_units_agree(seed: int, kind: str) -> None:
    torch.manual_seed(seed)
    report = diff(OneUnitNet(ACTS[kind]()), *data(seed), "mkldnn", "native")
    assert report.verdict == "agree", report.summary
    rows = [r for r in report.rows if r.layer == "unit" and r.mode == "local"]
    assert rows and all(r.error_a == 0 for r in rows)  # bit for bit


def test_a_clamp_bound_wrong_in_float32_is_found_at_the_unit() -> None:
    torch.manual_seed(0)
    model = OneUnitNet(_WrongInFloat32(-0.3, 0.7))
    with torch.no_grad():
        model.conv1.weight.mul_(4)  # some outputs above 0.7: the bound is used
    report = diff(model, *data(0), "mkldnn", "native")
    assert report.verdict == "mismatch", report.summary
    assert report.first_divergence is not None and report.first_divergence["layer"] == "unit", report.summary


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compare_of_equal_tensors_is_zero_and_keeps_its_scale(dtype: torch.dtype) -> None:
    from densenet_debug.verdict.compare import compare

    t = torch.randn(5, 7, dtype=dtype)
    c = compare(t, t.clone(), None)
    assert (c.error, c.tolerance, c.ratio) == (0.0, 0.0, 0.0) and c.scale == float(t.abs().max())
    nan = t.clone()
    nan[0, 0] = float("nan")
    assert compare(nan, t, None).ratio == float("inf")  # never "equal" through a NaN
