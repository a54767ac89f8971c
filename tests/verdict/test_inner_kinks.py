"""Kinks inside a composite unit: an ``F.relu`` in a module's own forward whose input is within rounding of 0.

The composite is replayed whole in fp32; its inner ReLU takes the other branch there, its grad_input differs
by a whole term. That is a kink (explained by the counterfactual oracle), not a mismatch; a real fault in the
same composite still is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_debug.verdict import inner_kinks
from densenet_debug.verdict.engine import diff

BUMP = 2.0**-30  # 1 + 2**-30 rounds to 1 in fp32: the pre-activation is 0 there, 2**-30 in fp64


class Composite(nn.Module):
    """``head(relu(lin(x) + t - c))`` written functionally: the ReLU is no unit of its own."""

    def __init__(self, wrong_backward: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        t = torch.zeros(4)
        t[0] = BUMP
        self.register_buffer("t", t)
        self.register_buffer("c", torch.tensor([1.0, 0.0, 0.0, 0.0]))
        self.wrong_backward = wrong_backward
        with torch.no_grad():  # feature 0 of lin is x[:, 0] exactly (1 for every sample, exact in fp32)
            self.lin.weight[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
            self.lin.bias[0] = 0.0

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        if self.wrong_backward:
            h = WrongInFp32.apply(h)
        return self.head(F.relu((h + self.t) - self.c))


class WrongInFp32(torch.autograd.Function):
    """Identity whose backward is wrong in float32 only: a backend fault, not the model's math."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # noqa: ANN001
        return g * 1.5 if g.dtype == torch.float32 else g


def model(wrong_backward: bool = False) -> nn.Module:
    torch.manual_seed(0)
    first = nn.Linear(4, 4)  # the identity, exactly: the composite's input needs a gradient
    with torch.no_grad():
        first.weight.copy_(torch.eye(4))
        first.bias.zero_()
    return nn.Sequential(first, Composite(wrong_backward))


def batch() -> tuple[Tensor, Tensor]:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    x[:, 0] = 1.0
    return x, torch.tensor([0, 1, 2])


def test_relu_inside_a_composite_at_its_boundary_is_a_kink() -> None:
    x, y = batch()
    report = diff(model(), x, y, "native", "fp64", math_check=False)
    rows = [r for r in report.rows if r.mode == "local" and r.layer == "1" and r.side in ("a", "both", None)]
    assert rows and not [r for r in rows if r.status == "mismatch"], [(r.quantity, r.status) for r in rows]
    kink_rows = [r for r in rows if r.status == "kink"]
    assert kink_rows and any(r.quantity == "grad_input" for r in kink_rows)
    assert all(r.error_a > r.tolerance for r in kink_rows)  # a mismatch before the kinks explained it
    assert "3 relu element(s)" in kink_rows[0].note
    found = [k for k in report.kinks if k.layer == "1" and k.mode == "local"]
    assert found and found[0].count == 3 and found[0].min_margin == BUMP


def test_a_real_fault_inside_the_composite_stays_a_mismatch() -> None:
    x, y = batch()
    report = diff(model(wrong_backward=True), x, y, "native", "fp64", math_check=False)
    rows = [r for r in report.rows if r.mode == "local" and r.layer == "1" and r.quantity == "grad_input"]
    assert rows and rows[0].status == "mismatch", [(r.quantity, r.status, r.note) for r in rows]
    assert report.verdict == "mismatch"


def _relu_calls(*inputs: Tensor, against: list | None = None) -> list:
    """The coded calls of ``torch.relu`` on each input, as the side's replay records them (``against``: the
    side's calls, as the reference's replay records them)."""
    rec = inner_kinks._Record(against)
    with rec:
        for x in inputs:
            torch.relu(x)
    return rec.calls


def test_no_flip_no_excuse() -> None:
    a = torch.tensor([1.0, -2.0], dtype=torch.float64)
    side = _relu_calls(a)
    assert inner_kinks.find(side, _relu_calls(a.clone(), against=side)) is None
    assert inner_kinks.find(side, []) is None  # calls that cannot be matched excuse nothing
    side = _relu_calls(torch.tensor([1e-9, -2.0], dtype=torch.float64))
    found = inner_kinks.find(side, _relu_calls(torch.tensor([-1e-9, -2.0], dtype=torch.float64), against=side))
    assert found.count == 1 and found.min_margin == 1e-9 and found.what == "1 relu"


def test_tf32_control_on_a_functional_user_model_is_no_longer_flagged() -> None:
    """The bench's false positive (bench_verdict_run1, functional-k4-2layers, batch 3, seed 120477): TF32
    rounding flips ReLUs written as ``F.relu`` inside the dense layers; both local and propagated rows failed."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    try:
        bench = importlib.import_module("benches.verdict")
    finally:
        sys.path.pop(0)
    from densenet_debug.faults.selftest import harness_batch

    x, y = harness_batch(3, 120477)
    report = diff(bench._user_model("functional", 0, 120477), x, y, "native+fault:tf32_round@*", "native",
                  math_check=False)
    assert report.verdict == "agree", report.summary
    kink_rows = [r for r in report.rows if r.status == "kink" and r.layer.startswith("dense.")]
    assert {r.mode for r in kink_rows} == {"local", "propagated"}
    assert all("relu element(s)" in r.note for r in kink_rows)


def test_a_relu_output_at_the_address_of_a_forced_one_is_not_forced() -> None:
    """The counterfactual forces calls by op and order, never by address: a checkpointed bottleneck frees its
    forward's relu output and an equal-shaped relu later takes that memory (bench verdict: a tf32 control
    flagged in the in-place style, now and then, when forced outputs were found again by address)."""
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[0, 0] = -1.0
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 0] = True
    passes = torch.ones(1, dtype=torch.bool)  # call 0 of relu and of threshold_backward: take the other branch
    force = inner_kinks._Force({"relu": {0: (mask, passes)}, "threshold_backward": {0: (mask, passes)}})
    g = torch.ones(3, 5, dtype=torch.float64)
    with force:
        buf = x.clone()
        forced = torch.relu_(buf)  # call 0, forced: passes at [0, 0]
        assert float(forced[0, 0]) == -1.0
        assert float(torch.ops.aten.threshold_backward.default(g, forced, 0)[0, 0]) == 1.0  # the side's branch
        again = torch.relu_(buf)  # call 1, not forced, same address and shape
        grad = torch.ops.aten.threshold_backward.default(g, again, 0)
    assert float(again[0, 0]) == 0.0 and float(grad[0, 0]) == 0.0
