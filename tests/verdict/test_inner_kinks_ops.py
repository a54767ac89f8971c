"""Kinks of every covered piecewise op inside a composite: the op written in a module's own forward, its input
placed within rounding of a branch boundary so that the float32 replay takes the other branch than float64.

Each case is a false alarm (``mismatch``) when only relu is covered and a ``kink`` with the op covered; a real
fault planted in the same composite (a gradient scaled in float32 only) stays a ``mismatch``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from densenet_debug.verdict import inner_kinks
from densenet_debug.verdict.engine import diff
from tests.verdict.test_inner_kinks import WrongInFp32  # an identity whose backward is wrong in fp32 only

BUMP = 2.0**-30  # 1 ± 2**-30 rounds to 1 in fp32: a coordinate 0 there, ±2**-30 in fp64


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
    # torchvision style: an in-place op in a checkpointed function (recomputed inside backward)
    "checkpointed_relu6_inplace": (lambda z: checkpoint(lambda t: F.relu6(t * 1.0, inplace=True), z,
                                                        use_reentrant=False), 1.0, False),
    "max_pool": (_pool, 1.0, True),  # the fp32 argmax is feature 0 (first of a tie), fp64's is feature 1
    # amax splits the gradient between tied maxima: its backward's ``eq`` with the maximum takes the branch
    "amax": (lambda z: torch.cat([z[:, :2].amax(1, keepdim=True), z[:, 2:].amax(1, keepdim=True)], 1), 1.0, True),
}
# Piecewise ops no rule covers, and a piecewise op whose own math differs by dtype: never excused.
UNCOVERED: dict[str, tuple[Callable[[Tensor], Tensor], float, bool]] = {
    # max over a dim routes the gradient by its argmax indices (a reduction's argmax: not covered)
    "max_dim": (lambda z: torch.cat([z[:, :2].max(1, keepdim=True).values, z[:, 2:].max(1, keepdim=True).values],
                                    1), 1.0, True),
    # the comparison's threshold itself depends on the dtype: another op, not the other branch of the same one
    "dtype_threshold": (lambda z: torch.where(z > (0.25 if z.dtype == torch.float32 else 0.0), z + 1.0, 2.0 * z),
                        1.0, False),
}
OP_OF = {"hardtanh": "hardtanh", "relu6_inplace": "hardtanh", "clamp": "clamp", "clamp_max": "clamp_max",
         "clamp_inplace": "clamp", "threshold": "threshold", "leaky_relu": "leaky_relu",
         "leaky_relu_inplace": "leaky_relu", "abs": "abs", "where": "gt", "maximum": "maximum",
         "max_pool": "max_pool2d_with_indices", "amax": "eq", "checkpointed_relu6_inplace": "hardtanh"}


class Composite(nn.Module):
    """``head(op(lin(x) - c))`` written functionally: the piecewise op is no unit of its own.

    The rounding happens inside the leaf unit ``lin`` (its bias adds ±2**-30 to ``x[:, 0] = 1``), so the code
    between units, checked in float64 on the side's own ``lin`` output, takes the side's branch.
    """

    def __init__(self, case: str, wrong_backward: bool = False) -> None:
        super().__init__()
        self.op, sign, second = {**CASES, **UNCOVERED}[case]
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
            else:  # features 2 and 3 at +-0.5, far from every boundary: every op passes a gradient through one
                self.lin.weight[2:] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # of them, so a planted fault shows
                self.lin.bias[2:] = torch.tensor([-0.5, -1.5])

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
    # the propagated rows too: the side's own inputs, the same flips
    propagated = [r for r in report.rows if r.mode == "propagated" and r.layer == "1" and r.status == "kink"]
    assert propagated and all(f"3 {OP_OF[case]} element(s)" in r.note for r in propagated)
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


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_the_kinks_of_cuda_sides_are_explained(case: str) -> None:
    """Both CUDA sides round the boundary element to 0 in float32, so both take the other branch there."""
    x, y = batch()
    report = diff(model(case), x, y, "cudnn", "no-cudnn", device="cuda", math_check=False)
    assert report.verdict == "agree", report.summary
    assert [k for k in report.kinks if k.layer == "1" and k.mode == "local"]
    faulty = diff(model(case, wrong_backward=True), x, y, "cudnn", "no-cudnn", device="cuda", math_check=False)
    assert faulty.verdict == "mismatch"


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(sorted(CASES)), sides=st.sampled_from([("native", "fp64"), ("mkldnn", "native")]),
       n=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_kink_or_fault_for_any_batch(case: str, sides: tuple[str, str], n: int, seed: int) -> None:
    """Any batch size and data, float32 against float64 or oneDNN against native: the boundary elements (one
    per sample) are kinks, the planted fault is not."""
    x, y = batch(n, seed)
    report = diff(model(case, seed=seed), x, y, *sides, math_check=False)
    assert report.verdict == "agree", report.summary
    found = [k for k in report.kinks if k.layer == "1" and k.mode == "local" and k.side in ("a", "")]
    assert found and found[0].count == n
    faulty = diff(model(case, wrong_backward=True, seed=seed), x, y, *sides, math_check=False)
    assert faulty.verdict == "mismatch"


@pytest.mark.parametrize("case", list(UNCOVERED))
def test_a_piecewise_op_no_rule_covers_excuses_nothing(case: str) -> None:
    x, y = batch()
    x[0, 1:3] = 0.1  # dtype_threshold: an element between the two thresholds, far from either boundary
    report = diff(model(case), x, y, "native", "fp64", math_check=False)
    rows = [r for r in _rows(report) if r.quantity == "grad_input"]
    assert rows and rows[0].status == "mismatch", [(r.quantity, r.status, r.note) for r in rows]
    assert report.verdict == "mismatch"


# -- kernels that decide wrong on their own inputs are no kinks ------------------------------------------------
class _Faulty(TorchDispatchMode):
    """A float32 kernel that decides wrong: ``op``'s output replaced by ``fault(output, args)``."""

    def __init__(self, op: object, fault: Callable[..., object]) -> None:
        super().__init__()
        self.op, self.fault = op, fault

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if func is self.op and args[0].dtype == torch.float32:
            out = self.fault(out, args)
        return out


def _calls(fn: Callable[[Tensor], Tensor], x: Tensor, faulty: _Faulty | None = None,
           against: list | None = None) -> list:
    """The coded calls of ``fn``'s forward and backward at ``x`` (as the side's replay records them, or against
    the side's calls as the reference's does)."""
    x = x.clone().requires_grad_(True)
    rec = inner_kinks._Record(against)
    with rec, (faulty if faulty is not None else contextlib.nullcontext()):
        fn(x).sum().backward()
    return rec.calls


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 40))
def test_a_relu_kernel_that_passes_negatives_is_no_kink(seed: int, n: int) -> None:
    """Its backward reads its result: a ``threshold_backward`` that "flips" where the forward did not."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[0] = -1.0
    fn = lambda t: torch.relu(t * 1.0)  # noqa: E731  (the relu reads a non-leaf, as in a model)
    side = _calls(fn, x.float(), _Faulty(torch.ops.aten.relu.default, lambda out, args: args[0].abs()))
    assert inner_kinks.find(side, _calls(fn, x, against=side)) is None
    honest = _calls(fn, x.float())
    assert inner_kinks.find(honest, _calls(fn, x, against=honest)) is None  # and no flip at all: no excuse


def test_a_max_pool_kernel_that_picks_a_smaller_pixel_is_no_kink() -> None:
    x = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    fn = lambda t: F.max_pool2d(t * 1.0, 2)  # noqa: E731

    def wrong_pick(out: tuple, args: tuple) -> tuple:
        values, idx = out
        return values, torch.zeros_like(idx)  # pixel 0: the smallest of the first window
    side = _calls(fn, x.float(), _Faulty(torch.ops.aten.max_pool2d_with_indices.default, wrong_pick))
    assert inner_kinks.find(side, _calls(fn, x, against=side)) is None
    # a true tie in float32 that float64 resolves: the side's pick is a maximum of its own window, a kink
    tie = x.clone()  # window 0 is pixels 0, 1, 4, 5: 1 is 5 and 5 is 5 + 2**-28, a tie in fp32 (ulp 2**-21)
    tie[0, 0, 0, 1], tie[0, 0, 1, 1] = 5.0, 5.0 + BUMP * 4
    side = _calls(fn, tie.float())
    found = inner_kinks.find(side, _calls(fn, tie, against=side))
    assert found is not None and found.by_op == {"max_pool2d_with_indices": 1}


def test_a_comparison_kernel_that_answers_wrong_is_no_kink() -> None:
    x = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    fn = lambda t: torch.where(t > 0, t, 2.0 * t)  # noqa: E731
    side = _calls(fn, x.float(), _Faulty(torch.ops.aten.gt.Scalar, lambda out, args: ~out))
    assert inner_kinks.find(side, _calls(fn, x, against=side)) is None


def test_a_scalar_bound_is_read_as_the_kernel_rounds_it() -> None:
    """``x > 0.1`` on float32 compares with 0.1 rounded to float32: at x = float32(0.1) it is False, though the
    exact float64 values say 0.1000000015 > 0.1. The side's branch is the kernel's, so fp64 flips there."""
    x = torch.tensor([0.1, 0.5], dtype=torch.float32)
    side = _calls(lambda t: torch.where(t > 0.1, t, 2.0 * t), x)
    gt = next(c for c in side if c.kind == "gt")
    assert gt.code.tolist() == (x > 0.1).tolist() == [False, True]
    ref = _calls(lambda t: torch.where(t > 0.1, t, 2.0 * t), x.double(), against=side)
    found = inner_kinks.find(side, ref)
    assert found is not None and found.by_op == {"gt": 1}
    assert found.min_margin == pytest.approx(float(x[0].double()) - 0.1, rel=1e-12)
