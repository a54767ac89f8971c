"""Derived tolerances: they hold for correct kernels (no false alarms) and are tight enough to catch small faults."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from densenet_debug.verdict.engine import local_check
from densenet_debug.verdict.tolerance import Precision, compare, confidence, linear_bound, underflow


def dot_loss(out: Tensor, target: Tensor) -> Tensor:
    return (out * target).sum()


def _check(model: nn.Module, x: Tensor, backend: str) -> list:
    """Local rows of ``model`` under ``backend``; ``x`` requires grad so the first unit's grad_input is checked."""
    target = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(1))
    return local_check(model, x.requires_grad_(True), target, backend, loss_fn=dot_loss)


def test_confidence_is_the_hoeffding_union_bound() -> None:
    lam = confidence(10**8)
    assert 10**8 * 2 * math.exp(-lam**2 / 2) == pytest.approx(1e-6, rel=1e-9)
    assert confidence(10**4) < lam


def test_linear_bound_terms() -> None:
    m = torch.tensor([1.0, 2.0], dtype=torch.float64)
    p = Precision(u_op=2.0**-24, u_acc=2.0**-24, u_out=2.0**-24, lam=8.0)
    assert torch.allclose(linear_bound(m, 2, 100)(p), m * (3 + 8 * 10) * 2.0**-24)
    assert torch.equal(linear_bound(m, 1, 1)(p), m * 2.0**-24)  # a cast: one rounding, nothing else
    assert underflow(torch.float32) == 2.0**-150


def test_compare_handles_missing_nan_and_exactness() -> None:
    o = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    assert compare(o.float(), o, torch.zeros(3, dtype=torch.float64)).ok
    assert not compare(o.float() + torch.tensor([0, 0, 1e-30]), o, torch.zeros(3, dtype=torch.float64)).ok
    assert math.isinf(compare(None, o, None).ratio) and math.isinf(compare(o[:2], o, None).ratio)
    nan = torch.tensor([math.nan])
    assert compare(nan, nan.double(), None).ok and not compare(nan, torch.ones(1, dtype=torch.float64), None).ok
    c = compare(o * (1 + 1e-6), o, torch.full((3,), 1e-6, dtype=torch.float64))
    assert c.worst == (1,) and c.ratio == pytest.approx(2.0, rel=1e-5) and c.error / c.tolerance == pytest.approx(2.0)


@given(seed=st.integers(0, 10**6), cin=st.integers(1, 24), cout=st.integers(1, 12), k=st.sampled_from([1, 3]),
       stride=st.sampled_from([1, 2]), n=st.integers(1, 4), hw=st.integers(1, 9),
       backend=st.sampled_from(["native", "mkldnn", "channels_last"]))
@settings(max_examples=12, deadline=None)
def test_conv_bounds_hold_for_correct_kernels(seed, cin, cout, k, stride, n, hw, backend) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=True))
    rows = _check(model, torch.randn(n, cin, hw, hw) * 3, backend)
    assert rows and all(r.status == "ok" for r in rows), [(r.layer, r.quantity, r.ratio_a) for r in rows]


@given(seed=st.integers(0, 10**6), offset=st.sampled_from([0.0, 30.0, 1000.0]), n=st.integers(2, 6),
       train=st.booleans())
@settings(max_examples=8, deadline=None)
def test_batchnorm_bounds_hold_under_cancellation(seed, offset, n, train) -> None:
    """A large mean makes the variance and the grads cancel: the |.| model must cover it, not flag it."""
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.fill_(offset)
    model = nn.Sequential(bn).train(train)
    rows = _check(model, offset + torch.randn(n, 5, 4, 4), "native")
    assert {r.quantity for r in rows} >= {"output", "grad_input", "grad_weight", "grad_bias"}
    assert all(r.status == "ok" for r in rows), [(r.quantity, r.ratio_a) for r in rows]


class _ScaledGradConv(nn.Conv2d):
    """In fp32 only, a conv whose weight gradient is off by a relative ``eps`` (the fp64 oracle is right)."""

    eps = 1e-3

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if x.dtype == torch.float64 else _Scale.apply(self.weight, 1 + self.eps)
        return self._conv_forward(x, w, self.bias)


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple:
        return g * ctx.factor, None


def test_a_small_relative_gradient_error_is_caught_in_fp32() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_ScaledGradConv(8, 8, 3, padding=1))
    rows = _check(model, torch.randn(4, 8, 8, 8), "native")
    bad = [r for r in rows if r.status == "mismatch"]
    assert [(r.quantity, r.pass_) for r in bad] == [("grad_weight", "backward")]
    assert bad[0].tolerance < _ScaledGradConv.eps / 5  # the bound is well below the planted error


class _UnbiasedBN(nn.BatchNorm2d):
    """In fp32 only, normalises with the unbiased variance: a relative output error of about 1/(2(R-1))."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float64:
            return super().forward(x)
        mean = x.mean((0, 2, 3), keepdim=True)
        var = x.var((0, 2, 3), unbiased=True, keepdim=True)
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def test_unbiased_normalisation_is_caught_by_the_batchnorm_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_UnbiasedBN(6))
    rows = _check(model, torch.randn(4, 6, 8, 8), "native")  # R = 256: a 2e-3 relative error
    assert any(r.status == "mismatch" and r.quantity == "output" for r in rows)


_U = st.sampled_from([2.0**-53, 2.0**-24, 2.0**-11, 2.0**-8, 0.0])


@settings(max_examples=6, deadline=None)
@given(p=st.tuples(_U, _U, _U, _U), q=st.tuples(_U, _U, _U, _U), eval_mode=st.booleans())
def test_bounds_are_linear_in_the_roundoffs_so_the_teacher_adds(p: tuple, q: tuple, eval_mode: bool) -> None:
    """``B(p.plus(q)) == B(p) + B(q)`` for every quantity of every unit (conv, BN, pools, linear, ReLU, cat):
    what lets a local row carry the float64 teacher's own bound in one evaluation (``local.with_teacher``)."""
    from densenet_debug.models import build_model
    from densenet_debug.reference.record import one_thread_oracle
    from densenet_debug.verdict.tolerance import unit_bounds

    torch.manual_seed(0)
    model = build_model("densenet-bc-10")
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 7])
    trace = one_thread_oracle(model, x, y, eval_mode=eval_mode, keep_graph=False)[0]
    ref = model.double()
    modules = dict(ref.named_modules())
    pp = Precision(u_op=p[0], u_acc=p[1], u_out=p[2], u_cmp=p[3], lam=7.5, eta=1e-300)
    qq = Precision(u_op=q[0], u_acc=q[1], u_out=q[2], u_cmp=q[3], lam=7.5, eta=2e-300)
    checked = 0
    for rec in trace:
        module = modules[rec.name]
        bounds = unit_bounds(module, rec, {n: t.detach() for n, t in module.named_parameters(recurse=False)})
        for key in bounds.fns:
            both, a, b = bounds.bound(key, pp.plus(qq)), bounds.bound(key, pp), bounds.bound(key, qq)
            assert torch.allclose(both, a + b, rtol=1e-12, atol=0), (rec.name, key)
            checked += 1
    assert checked > 40


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), eval_mode=st.booleans(), bound_first=st.booleans())
def test_batchnorm_terms_are_the_same_whether_its_bounds_state_them_or_not(seed: int, eval_mode: bool,
                                                                            bound_first: bool) -> None:
    """BN's scale of the terms comes from the passes its first bound evaluation makes; asked for first, it is
    computed on its own (``_bn_terms``): the same numbers either way, for every quantity."""
    from densenet_debug.models import build_model
    from densenet_debug.reference.record import one_thread_oracle
    from densenet_debug.verdict.tolerance import NORM, fp64_precision, unit_bounds

    torch.manual_seed(seed)
    model = build_model("densenet-bc-10")
    x, y = torch.randn(2, 3, 8, 8) * 3 + 1, torch.tensor([1, 7])
    trace = one_thread_oracle(model, x, y, eval_mode=eval_mode, keep_graph=False)[0]
    modules = dict(model.double().named_modules())
    p = fp64_precision(7.5)
    checked = 0
    for rec in trace:
        module = modules[rec.name]
        if not isinstance(module, NORM):
            continue
        params = {n: t.detach() for n, t in module.named_parameters(recurse=False)}
        lazy, alone = unit_bounds(module, rec, params), unit_bounds(module, rec, params)
        if bound_first:
            for key in lazy.fns:
                lazy.bound(key, p)
        for key in alone.fns:  # the same formulas on the same tensors (one order of additions on any build)
            want = alone.scale(key)
            assert (lazy.scale(key) is None) == (want is None), (rec.name, key)
            assert want is None or lazy.scale(key) == pytest.approx(want, rel=1e-14, abs=0), (rec.name, key)
        assert lazy.terms.keys() == alone.terms.keys()
        checked += 1
    assert checked >= 3
