"""Kinks of every covered piecewise op inside a composite: the op written in a module's own forward, its input
placed within rounding of a branch boundary so that the float32 replay takes the other branch than float64.

Each case is a false alarm (``mismatch``) when only relu is covered and a ``kink`` with the op covered; a real
fault planted in the same composite (a gradient scaled in float32 only) stays a ``mismatch``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from densenet_debug.verdict import inner_kinks
from densenet_debug.verdict.engine import diff

BUMP = 2.0**-30  # 1 ± 2**-30 rounds to 1 in fp32: a coordinate 0 there, ±2**-30 in fp64


class WrongInFp32(torch.autograd.Function):
    """Identity whose backward is wrong in float32 only: a backend fault, not the model's math."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # noqa: ANN001
        return g * 1.5 if g.dtype == torch.float32 else g


def _pool(z: Tensor) -> Tensor:
    """Features 0 and 1 as one 1x2 window (a tie in fp32, feature 1 larger in fp64), 2 and 3 as another."""
    return F.max_pool2d(z.reshape(-1, 1, 2, 2), (1, 2)).flatten(1)


# op name, the piecewise op, the sign of the bump (which side of the boundary fp64 lies on), whether feature 1
# (not 0) carries the bump. fp32 sees the coordinate exactly 0; each op's branch at 0 differs from fp64's side.
CASES: dict[str, tuple[Callable[[Tensor], Tensor], float, bool]] = {
    "hardtanh": (lambda z: F.hardtanh(z, 0.0, 6.0), 1.0, False),  # a bound is outside: fp32 0 gets no gradient
    "relu6_inplace": (lambda z: F.relu6(z, inplace=True), 1.0, False),  # hardtanh_backward reads the result
    "clamp": (lambda z: torch.clamp(z, min=0.0, max=6.0), -1.0, False),  # a bound is inside: fp64 is below
    "clamp_max": (lambda z: z.clamp_max(0.0), 1.0, False),
    "clamp_inplace": (lambda z: z.clamp_(min=0.0), -1.0, False),
    "threshold": (lambda z: F.threshold(z, 0.0, -0.5), 1.0, False),  # a jump of 0.5 in the value too
    "leaky_relu": (lambda z: F.leaky_relu(z, 0.1), 1.0, False),
    "leaky_relu_inplace": (lambda z: F.leaky_relu(z, 0.1, inplace=True), 1.0, False),
    "abs": (lambda z: z.abs(), 1.0, False),
    "where": (lambda z: torch.where(z > 0, z + 1.0, 2.0 * z), 1.0, False),  # a jump of 1 in the value
    "maximum": (lambda z: torch.maximum(z, torch.zeros_like(z)), 1.0, False),  # fp32 ties: half the gradient
    "max_pool": (_pool, 1.0, True),  # the fp32 argmax is feature 0 (first of a tie), fp64's is feature 1
}
OP_OF = {"hardtanh": "hardtanh", "relu6_inplace": "hardtanh", "clamp": "clamp", "clamp_max": "clamp_max",
         "clamp_inplace": "clamp", "threshold": "threshold", "leaky_relu": "leaky_relu",
         "leaky_relu_inplace": "leaky_relu", "abs": "abs", "where": "gt", "maximum": "maximum",
         "max_pool": "max_pool2d_with_indices"}


class Composite(nn.Module):
    """``head(op(lin(x) - c))`` written functionally: the piecewise op is no unit of its own.

    The rounding happens inside the leaf unit ``lin`` (its bias adds ±2**-30 to ``x[:, 0] = 1``), so the code
    between units, checked in float64 on the side's own ``lin`` output, takes the side's branch.
    """

    def __init__(self, case: str, wrong_backward: bool = False) -> None:
        super().__init__()
        self.op, sign, second = CASES[case]
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(2 if second else 4, 3)
        at = 1 if second else 0
        c = torch.zeros(4)
        c[at] = 0.0 if second else 1.0  # max-pool: the boundary is the tie with feature 0, itself exactly 1
        self.register_buffer("c", c)
        self.wrong_backward = wrong_backward
        with torch.no_grad():  # feature ``at`` is 1 plus the bump: 1 in fp32, 1 ± 2**-30 in fp64
            self.lin.weight[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # x[:, 0] = 1
            self.lin.weight[at] = torch.tensor([1.0, 0.0, 0.0, 0.0] if at == 0 else [0.0, 0.0, 0.0, 1.0])
            self.lin.bias[:2] = 0.0
            self.lin.bias[at] = sign * BUMP
            if second:  # the other window stays below 1
                self.lin.bias[2:] = -5.0

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        if self.wrong_backward:
            h = WrongInFp32.apply(h)
        return self.head(self.op(h - self.c))


def model(case: str, wrong_backward: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    first = nn.Linear(4, 4)  # the identity, exactly: the composite's input needs a gradient
    with torch.no_grad():
        first.weight.copy_(torch.eye(4))
        first.bias.zero_()
    return nn.Sequential(first, Composite(case, wrong_backward))


def batch(n: int = 3, seed: int = 1) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    x[:, 0] = 1.0
    x[:, 3] = 1.0  # max-pool's tie: feature 1 reads x[:, 3], so the two branches route the gradient apart
    return x, torch.arange(n) % 3


def _rows(report: object) -> list:
    return [r for r in report.rows if r.mode == "local" and r.layer == "1" and r.side in ("a", "both", None)]


@pytest.fixture
def relu_only(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Inner kinks as they were: relu and its threshold_backward only."""
    def restrict() -> None:
        kept = {k: v for k, v in inner_kinks._RULES.items() if k in ("relu", "threshold_backward")}
        monkeypatch.setattr(inner_kinks, "_RULES", kept)
    return restrict


@pytest.mark.parametrize("case", list(CASES))
def test_a_piecewise_op_at_its_boundary_inside_a_composite_is_a_kink(case: str, relu_only: Callable) -> None:
    x, y = batch()
    report = diff(model(case), x, y, "native", "fp64", math_check=False)
    rows = _rows(report)
    assert rows and not [r for r in rows if r.status == "mismatch"], [(r.quantity, r.status, r.note) for r in rows]
    kink_rows = [r for r in rows if r.status == "kink"]
    assert any(r.quantity == "grad_input" for r in kink_rows)
    assert all(r.error_a > r.tolerance for r in kink_rows)  # a mismatch before the kinks explained it
    assert f"3 {OP_OF[case]} element(s)" in kink_rows[0].note, kink_rows[0].note
    found = [k for k in report.kinks if k.layer == "1" and k.mode == "local"]
    assert found and found[0].count == 3 and found[0].min_margin == BUMP
    assert report.verdict == "agree", report.summary

    relu_only()  # without the op covered, the same row is a false alarm
    before = diff(model(case), x, y, "native", "fp64", math_check=False)
    assert any(r.status == "mismatch" and r.quantity == "grad_input" for r in _rows(before))
    assert before.verdict == "mismatch"


@pytest.mark.parametrize("case", list(CASES))
def test_a_real_fault_in_the_same_composite_stays_a_mismatch(case: str) -> None:
    x, y = batch()
    report = diff(model(case, wrong_backward=True), x, y, "native", "fp64", math_check=False)
    rows = [r for r in _rows(report) if r.quantity == "grad_input"]
    assert rows and rows[0].status == "mismatch", [(r.quantity, r.status, r.note) for r in rows]
    assert report.verdict == "mismatch"


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(["clamp", "where", "max_pool", "leaky_relu_inplace"]), n=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_kink_or_fault_for_any_batch(case: str, n: int, seed: int) -> None:
    """Any batch size and data: the boundary elements (one per sample) are kinks, the planted fault is not."""
    x, y = batch(n, seed)
    report = diff(model(case, seed=seed), x, y, "native", "fp64", math_check=False)
    assert report.verdict == "agree", report.summary
    found = [k for k in report.kinks if k.layer == "1" and k.mode == "local"]
    assert found and found[0].count == n
    faulty = diff(model(case, wrong_backward=True, seed=seed), x, y, "native", "fp64", math_check=False)
    assert faulty.verdict == "mismatch"
