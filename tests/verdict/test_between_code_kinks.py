"""Kinks of the code *between* units: a value the between code computes with rounding crosses a piecewise op's
boundary there (``F.relu((h + t) - c)``: a residual sum, then an in-forward relu, clamp, max-pool ...).

The between check re-runs that code in float64 on the side's unit outputs; where the side's float32
``(h + t) - c`` lands on one side of the boundary and the float64 re-run on the other, the expected grad_output
of ``conv1``/``conv2`` differs by a whole gradient term from what a correct backend hands them. These models
provoke it on purpose: ``c`` is the side's own float32 ``h + t`` at an element whose exact sum lies on the other
side, so the side's op sits exactly on its boundary and the float64 re-run just off it. The check must call
such a row ``kink`` (the side may take either branch there), never ``mismatch``; a wrong gradient through the
same code (float32 only) must stay a between mismatch, and an element far from any boundary no kink at all.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from densenet_debug.backends import U64, parse_backend, unit_roundoff
from densenet_debug.verdict.between import _Tracker
from densenet_debug.verdict.engine import diff
from densenet_debug.verdict.magnitude import Branches, MagnitudeMode
from densenet_debug.verdict.report import Status
from densenet_debug.verdict.tolerance import underflow
from tests.verdict.test_between_branches import _ScaleInFloat32

PAIRS = [("native", "fp64"), ("mkldnn", "native")]
JUMPS = {"gate", "threshold_value"}  # the forward value jumps at the boundary too (bn's input)
# The side of the boundary the exact sum must lie on for the side's op, at the boundary, to take the other
# branch than the float64 re-run (clamp's backward passes at its bound; hardtanh's does not).
KINDS = {"relu": 1, "relu_inplace": 1, "threshold": 1, "leaky_relu": 1, "clamp": -1, "hardtanh": -1, "abs": 1,
         "maximum": 1, "max_pool": 1, "where": 1, "gate": 1, "threshold_value": 1}


class ResidualKink(nn.Module):
    """Two convolutions summed in the model's own forward, minus an offset, then a piecewise op: all of it code
    between units. ``fault``: a float32-only wrong gradient on ``h`` in that same code."""

    def __init__(self, kind: str, fault: bool = False, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)
        self.register_buffer("offset", torch.zeros(()))
        self.kind, self.fault = kind, fault

    def forward(self, x: Tensor) -> Tensor:
        h, t = self.conv1(x), self.conv2(x)
        if self.fault:
            h = _ScaleInFloat32.apply(h)
        u = (h + t) - self.offset
        if self.kind == "relu":
            z = F.relu(u)
        elif self.kind == "relu_inplace":
            z = F.relu(u, inplace=True)
        elif self.kind == "threshold":
            z = F.threshold(u, 0.0, 0.0)
        elif self.kind == "threshold_value":  # a jump in forward: u above 0, -0.5 at and below
            z = F.threshold(u, 0.0, -0.5)
        elif self.kind == "gate":  # a jump in forward: h or t
            z = torch.where(u > 0, h, t)
        elif self.kind == "leaky_relu":
            z = F.leaky_relu(u, 0.1)
        elif self.kind == "clamp":
            z = torch.clamp(u, min=0.0)
        elif self.kind == "hardtanh":
            z = F.hardtanh(u, -1.0, 0.0)
        elif self.kind == "abs":
            z = u.abs()
        elif self.kind == "maximum":
            z = torch.maximum(h + t, self.offset.expand_as(h))
        elif self.kind == "max_pool":  # each window: a zero, then u (a tie takes the first)
            z = F.max_pool2d(torch.stack([torch.zeros_like(u), u], -1).flatten(-2), (1, 2))
        else:
            z = torch.where(u > 0, u, 0.5 * u)
        return self.fc(F.adaptive_avg_pool2d(self.bn(z), 1).flatten(1))


def _data(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 6, 6, generator=g), torch.randint(0, 5, (2,), generator=g)


def _provoke(model: ResidualKink, x: Tensor, backend: str, direction: int, away: float = 0.0) -> None:
    """Set the offset to the side's own float32 ``h + t`` at an element whose exact sum lies on ``direction``'s
    side of it (``away``: that far from it instead, relative)."""
    with torch.no_grad(), parse_backend(backend).active():
        h, t = model.conv1(x), model.conv2(x)
        s32, s64 = (h + t).double(), h.double() + t.double()
        where = (s64 > s32) if direction > 0 else (s64 < s32)
        at = int(where.flatten().nonzero()[0])
        model.offset.fill_(float(s32.flatten()[at]) * (1 + away))


def _model(kind: str, seed: int, backend: str, fault: bool = False, away: float = 0.0) -> tuple:
    torch.manual_seed(seed)
    model = ResidualKink(kind, fault)
    x, y = _data(seed)
    _provoke(model, x, backend, KINDS[kind], away)
    return model, x, y


def _between(report: object) -> list:
    return [r for r in report.rows if r.mode == "between"]


def _show(report: object) -> list:
    return [(r.layer, r.quantity, str(r.status), r.ratio_a, r.ratio_b) for r in _between(report)
            if r.status != Status.OK]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_provoked_kink_of_the_between_code_is_a_kink_not_a_mismatch(kind: str) -> None:
    """Side a is provoked: its between rows at conv1/conv2 exceed the rounding bound (the false alarm of
    before) and are within the kink allowance of the ambiguous elements."""
    for pair in PAIRS:
        report = diff(*_model(kind, 0, pair[0]), *pair, math_check=False)
        assert report.verdict == "agree", (pair, _show(report))
        kinks = [r for r in _between(report) if r.status == Status.KINK]
        expected = {("conv1", "grad_output"), ("conv2", "grad_output")}
        expected |= {("bn", "input")} if kind in JUMPS else set()
        assert {(r.layer, r.quantity) for r in kinks} == expected, (pair, _show(report))
        assert all(r.ratio_a > 1 for r in kinks)  # beyond rounding alone
        assert all("kink" in r.note for r in kinks)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(sorted(KINDS)), pair=st.sampled_from(PAIRS))
def test_correct_backends_agree_on_every_provoked_seed(seed: int, kind: str, pair: tuple) -> None:
    report = diff(*_model(kind, seed, pair[0]), *pair, math_check=False)
    assert report.verdict == "agree", (seed, kind, pair, _show(report))
    assert any(r.status == Status.KINK and r.ratio_a > 1 for r in _between(report)), _show(report)


def test_the_verdict_line_and_the_kink_line_count_the_between_kinks() -> None:
    """A reader of the one-line verdict and of the kink line learns that between rows are kinks, not that
    "0 element(s) in 0 unit(s)" explain them."""
    from densenet_debug.verdict.render import kink_line

    report = diff(*_model("relu", 0, "native"), "native", "fp64", math_check=False)
    n = sum(1 for r in _between(report) if r.status == Status.KINK)
    assert report.verdict == "agree" and n >= 2
    phrase = f"{n} between row(s) explained by a branch the code between units took within rounding of its boundary"
    assert phrase in report.summary
    line = kink_line(report)
    assert phrase in line and not line.startswith("kinks: none")


def test_fail_on_kink_fails_a_provoked_kink() -> None:
    report = diff(*_model("relu", 0, "native"), "native", "fp64", math_check=False, fail_on="kink")
    assert report.verdict == "mismatch"


@pytest.mark.parametrize("kind", ["relu", "max_pool", "maximum", "where", "gate"])
def test_a_wrong_gradient_through_the_same_code_is_still_a_between_mismatch(kind: str) -> None:
    """A float32-only fault on conv1's output (channel 1 of its gradient scaled by 1.01) through the same
    kinked code: conv1's between grad_output stays a mismatch (the allowance covers the ambiguous elements
    only); conv2's, which the fault does not reach, stays a kink."""
    for pair in PAIRS:
        report = diff(*_model(kind, 0, pair[0], fault=True), *pair, math_check=False)
        assert report.verdict == "mismatch"
        rows = {r.layer: r for r in _between(report) if r.quantity == "grad_output"}
        assert rows["conv1"].status == Status.MISMATCH, (pair, _show(report))
        assert rows["conv2"].status == Status.KINK, (pair, _show(report))


@pytest.mark.parametrize("kind", ["relu", "max_pool", "clamp", "gate"])
def test_far_from_the_boundary_nothing_is_a_kink(kind: str) -> None:
    """The same code with the offset 1e-4 (relative) away from the side's sum: no element is within rounding of a
    boundary, so no allowance: every between row passes on the rounding bound alone."""
    for pair in PAIRS:
        report = diff(*_model(kind, 0, pair[0], away=1e-4 * KINDS[kind]), *pair, math_check=False)
        assert report.verdict == "agree", _show(report)
        assert all(r.status == Status.OK for r in _between(report)), _show(report)


def _code(h: Tensor, t: Tensor, c: float, floor: Tensor) -> tuple[Tensor, Tensor]:
    """Between code: a residual sum, an offset, a ReLU; and a maximum of the sum against a floor."""
    return F.relu((h + t) - c), torch.maximum(h + t, floor)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 64), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_every_element_float32_decides_otherwise_is_ambiguous(seed: int, n: int, scale: float) -> None:
    """The derived criterion is sound elementwise: wherever float32 evaluation of the code (the side) puts
    ``(h + t) - c`` or ``h + t - floor`` on another side of 0 than float64 does on the same float32 operands,
    the magnitude run marks the element ambiguous; and it marks only elements within the bound."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, generator=g) * scale
    t = torch.randn(n, generator=g) * scale
    s32 = h + t
    above = ((h.double() + t.double()) > s32.double()).nonzero().flatten()  # exact sums above their float32 ones
    i = int(above[0]) if above.numel() else int(torch.randint(0, n, (1,), generator=g))
    c = float(s32[i])  # element i on the boundary in float32 (relu blocks), above it in float64 (passes)
    floor = s32[torch.randperm(n, generator=g)]
    h64, t64, floor64 = h.double(), t.double(), floor.double()
    branches = Branches()
    with _Tracker(branches):
        _code(h64, t64, c, floor64)
    branches.roundoff, branches.eta = unit_roundoff(torch.float32) + U64, 2 * underflow(torch.float32)
    with MagnitudeMode(branches=branches):
        _code(h64.abs(), t64.abs(), c, floor64.abs())
    u32, u64 = (h + t) - c, (h64 + t64) - c
    v32, v64 = s32 - floor, (h64 + t64) - floor64
    for op, side, exact, terms, rounds in (("relu", u32, u64, h64.abs() + t64.abs() + abs(c), 2),
                                           ("maximum", v32, v64, h64.abs() + t64.abs() + floor64.abs(), 1)):
        amb = branches.ambiguity(op, 0)
        flipped = (side > 0) != (exact > 0)
        flagged = torch.zeros(n, dtype=torch.bool) if amb is None else amb
        assert bool((flipped <= flagged).all()), (op, int(flipped.sum()), int(flagged.sum()))
        assert op != "relu" or not above.numel() or bool(flipped[i])  # the property is not vacuous
        bound = rounds * (branches.roundoff * terms + branches.eta)
        assert bool((exact.abs()[flagged] <= bound[flagged]).all())
