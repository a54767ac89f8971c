"""Near-zero truths: a quantity whose terms cancel (a conv bias before a batch norm) reads on sum |terms|.

BN makes its grad_input sum to zero per channel, so the gradient of a conv bias in front of it is ~1e-17 while
its terms are O(1). Errors and tolerances divided by that truth read 1e+8 and 1e+10, and such a tolerance
swamps every first-order sum it enters. On the scale of the terms both read like float32 rounding, a wrong
bias gradient is still caught at its unit, and the propagated rows upstream keep tight tolerances.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from densenet_debug.gradcheck.engine import gradcheck_model
from densenet_debug.verdict.compare import compare, oracle_scale, relative_error, terms_scale
from densenet_debug.verdict.engine import diff

PLANTED = 1e-4  # a wrong bias gradient: this fraction of the channel's sum |grad_output|, float32 only


class _WrongBiasGrad(torch.autograd.Function):
    """Identity on the bias; its gradient gains PLANTED * sum|g| per channel, in the dtypes of ``WRONG_IN``."""

    WRONG_IN = (torch.float32,)

    @staticmethod
    def forward(ctx, bias: Tensor, out: Tensor) -> Tensor:  # noqa: ANN001
        return out + bias.view(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        grad_bias = g.sum((0, 2, 3))
        if g.dtype in _WrongBiasGrad.WRONG_IN:
            grad_bias = grad_bias + PLANTED * g.abs().sum((0, 2, 3))
        return grad_bias, g


class WrongBiasConv(nn.Conv2d):
    """A user's conv whose bias gradient is hand-written, and wrong in float32."""

    def forward(self, x: Tensor) -> Tensor:
        return _WrongBiasGrad.apply(self.bias, F.conv2d(x, self.weight, None, self.stride, self.padding))


class BiasBeforeBN(nn.Module):
    """conv (with bias) -> BN -> F.relu, twice, then a cat and a linear head: the user's usual shape."""

    def __init__(self, conv: type[nn.Conv2d] = nn.Conv2d, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = conv(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(14, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(self.conv1(x)))
        b = F.relu(self.bn2(self.conv2(a)))
        return self.fc(F.adaptive_avg_pool2d(torch.cat([a, b], 1), 1).flatten(1))


def _diff(model: nn.Module, seed: int = 0, batch: int = 4):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, 5, (batch,), generator=g)
    return diff(model, x, y, "mkldnn", "native")


def _row(report, layer: str, quantity: str, mode: str):  # noqa: ANN001, ANN202
    return next(r for r in report.rows if r.layer == layer and r.quantity == quantity and r.mode == mode)


@pytest.mark.parametrize("seed", [0, 1])
def test_bias_before_bn_reads_like_float32_rounding(seed: int) -> None:
    torch.manual_seed(seed)
    report = _diff(BiasBeforeBN(), seed)
    assert report.verdict == "agree", report.summary
    for layer in ("conv1", "conv2"):
        local, prop = _row(report, layer, "grad_bias", "local"), _row(report, layer, "grad_bias", "propagated")
        # the truth itself cancels: relative to it the error would read ~1e+8
        assert local.scale is not None and local.scale > 1e-3  # sum |g| over N*H*W, not the ~1e-17 sum
        assert max(local.error_a, local.error_b) < 1e-6 and 1e-7 < local.tolerance < 1e-4
        assert max(prop.error_a, prop.error_b) < 1e-5 and prop.tolerance < 1e-3
    # nothing the propagated rule sums is swamped: every tolerance stays float32-sized
    assert max(r.tolerance for r in report.rows) < 1e-3
    assert all(r.status == "ok" for r in report.rows)


def test_the_truth_of_such_a_bias_gradient_cancels() -> None:
    """The premise: without the scale of the terms these rows would divide by ~1e-17."""
    torch.manual_seed(0)
    model = BiasBeforeBN().double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    F.cross_entropy(model(x), torch.randint(0, 5, (4,))).backward()
    grad = model.conv2.bias.grad
    assert float(grad.abs().max()) < 1e-12 < 1e-3 < float(model.conv2.weight.grad.abs().max())


def test_a_wrong_bias_gradient_before_bn_is_still_caught_at_its_unit() -> None:
    torch.manual_seed(0)
    report = _diff(BiasBeforeBN(WrongBiasConv))
    assert report.verdict == "mismatch"
    first = report.first_divergence
    # the hand-written Function is the smallest failing unit (verdict.functions); its conv's row fails too
    assert (first["layer"], first["quantity"], first["mode"], first["pass"]) == (
        "conv2 · _WrongBiasGrad", "grad_input", "function", "backward")
    row = _row(report, "conv2", "grad_bias", "local")
    assert row.status == "mismatch" and row.side == "both" and row.explained_by == "conv2 · _WrongBiasGrad"
    # read on sum |terms|, the error is the planted fraction itself, and well over its tolerance
    assert row.error_a == pytest.approx(PLANTED, rel=0.05) and row.tolerance < PLANTED / 10
    assert "error 1e-04 > tolerance" in report.summary or "error 0.0001" in report.summary


def test_compare_reads_error_and_tolerance_on_the_terms() -> None:
    truth = torch.tensor([1e-17, -2e-17, 0.5], dtype=torch.float64)
    side = truth + torch.tensor([1e-8, 0.0, 0.0], dtype=torch.float64)
    bound = torch.full((3,), 1e-7, dtype=torch.float64)
    old, new = compare(side, truth, bound), compare(side, truth, bound, terms=2.0)
    assert new.scale == 2.0 and old.scale == 0.5
    assert new.ratio == old.ratio == pytest.approx(0.1)  # the verdict is elementwise: the scale cannot move it
    assert new.error == pytest.approx(5e-9) and new.tolerance == pytest.approx(5e-8)
    # the terms never read below the truth itself (a heuristic error model may understate them)
    assert compare(side, truth, bound, terms=1e-3).scale == 0.5


def test_relative_error_uses_the_scale_a_local_row_left() -> None:
    truth = torch.tensor([1e-17, -1e-17], dtype=torch.float64)
    side = truth + 1e-9
    cache: dict = {}
    assert relative_error(side, truth, cache) == pytest.approx(1e-9 / 1e-17)  # nothing known: max |truth|
    assert terms_scale(cache, truth) is None
    compare(side, truth, torch.full((2,), 1e-8, dtype=torch.float64), cache=cache, terms=3.0)
    assert terms_scale(cache, truth) == 3.0 and oracle_scale(truth, cache) == 3.0
    assert relative_error(side, truth, cache) == pytest.approx(1e-9 / 3.0)
    assert terms_scale(cache, truth.clone()) is None  # keyed by the tensor itself, never by an equal one
    # a stored all-zero truth: exact without terms, on the terms with them
    zero = torch.zeros(2, dtype=torch.float64)
    assert math.isinf(relative_error(zero + 1e-20, zero, zero_truth_exact=True))
    assert relative_error(zero + 1e-20, zero, zero_truth_exact=True, terms=1.0) == pytest.approx(1e-20)


@given(seed=st.integers(0, 10**6), n=st.integers(2, 64), k=st.integers(2, 200))
@settings(max_examples=25, deadline=None)
def test_float32_sums_that_cancel_read_at_float32_rounding(seed: int, n: int, k: int) -> None:
    """Centred terms (sum exactly ~0 in fp64) summed in float32: error / sum|terms| is O(u sqrt(K))."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, k, generator=g, dtype=torch.float64)
    t -= t.mean(1, keepdim=True)
    truth, terms = t.sum(1), t.abs().sum(1)
    side = t.float().sum(1)
    err = relative_error(side, truth, terms=float(terms.max()))
    assert err <= 2.0**-24 * (2 + 8 * math.sqrt(k))  # the casts (u) plus a sum's probabilistic bound


def _gradcheck(model: nn.Module):  # noqa: ANN202
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)
    return gradcheck_model(model, x, y)


def test_gradcheck_reads_a_cancelling_bias_gradient_on_its_terms() -> None:
    torch.manual_seed(0)
    report = _gradcheck(BiasBeforeBN())
    assert report.verdict == "pass"
    bias_rows = [r for r in report.rows if r.tensor in ("bias", "conv2.bias", "conv1.bias")
                 and r.layer in ("conv1", "conv2", "")]
    assert bias_rows
    for r in bias_rows:  # divided by the ~1e-17 gradient these read 1e+5, 1e+8 and a resolution of 1e+10
        assert r.error < 1e-9 and r.tolerance < 1e-6 and r.resolution is not None and r.resolution < 1e-3, r
    assert max(r.resolution for r in report.rows if r.resolution is not None) < 1e-3


def test_gradcheck_catches_a_wrong_bias_gradient_before_bn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_WrongBiasGrad, "WRONG_IN", (torch.float32, torch.float64))
    torch.manual_seed(0)
    report = _gradcheck(BiasBeforeBN(WrongBiasConv))
    assert report.verdict == "fail"
    # named at the hand-written backward (a unit inside conv2), and conv2's bias row fails too
    assert report.first_failure == {"layer": "conv2 · _WrongBiasGrad", "tensor": "custom Function <w, J v>"}
    row = next(r for r in report.rows if r.layer == "conv2" and r.tensor == "bias")
    assert row.status == "fail" and not row.culprit
    assert row.error > 10 * row.tolerance and row.error < 1.0  # the planted 1e-4 of the terms, on their scale
