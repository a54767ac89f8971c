"""Custom autograd Functions as teacher-forced units (verdict/functions.py), in models written as users write them.

Styles: module style (a ``Cat`` module whose forward applies the Function, ``nn.ReLU`` modules), functional
(``F.relu`` and the Function's cat in the layer's forward, squeezed log-probabilities), in-place (torchvision's
``nn.ReLU(inplace=True)``, a list of features concatenated by the Function in the block, optionally a
checkpointed bottleneck), and the Function in the model's own forward, between units. The planted fault is a cat
backward that hands its first input the slice one channel to the right, only where oneDNN is on and the gradient
is float32: right in float64, right on ``native``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from densenet_debug.cli import main
from densenet_debug.verdict import functions
from densenet_debug.verdict.engine import diff, local_check
from densenet_debug.verdict.render import leading_rows
from densenet_debug.verdict.report import FAILING, Status


# -- custom Functions ---------------------------------------------------------------------------------------
class CatFn(torch.autograd.Function):
    """torch.cat along channels with a hand-written backward: each input gets its slice."""

    @staticmethod
    def forward(ctx, *features: Tensor) -> Tensor:
        ctx.sizes = [f.shape[1] for f in features]
        return torch.cat(features, 1)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple:
        return tuple(g.split(ctx.sizes, 1))


def _onednn_float32(t: Tensor) -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and t.dtype == torch.float32


class OneDNNWrongCatFn(CatFn):
    """Under oneDNN in float32 the first input gets the slice one channel off (an offset, #708-style)."""

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple:
        parts = list(g.split(ctx.sizes, 1))
        if _onednn_float32(g):
            parts[0] = g.roll(1, 1)[:, :ctx.sizes[0]]
        return tuple(parts)


class ScaleFn(torch.autograd.Function):
    """``x * s`` with a float argument; wrong backward (``3 s``) under oneDNN float32 when ``s == 0.5`` only."""

    @staticmethod
    def forward(ctx, x: Tensor, s: float) -> Tensor:
        ctx.s = s
        return x * s

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple:
        wrong = ctx.s == 0.5 and _onednn_float32(g)
        return g * (3 * ctx.s if wrong else ctx.s), None


class ShiftFn(torch.autograd.Function):
    """Identity with identity backward; under oneDNN float32 its forward adds 1e-3 (a wrong forward)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x + 1e-3 if _onednn_float32(x) else x.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g


class NanGradFn(torch.autograd.Function):
    """Identity; under oneDNN float32 its backward returns NaN in one element."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        g = g.clone()
        if _onednn_float32(g):
            g.view(-1)[0] = math.nan
        return g


# -- user models ------------------------------------------------------------------------------------------------
class Cat(nn.Module):
    """Module style: the concatenation is a module of its own."""

    def __init__(self, fn: type) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *xs: Tensor) -> Tensor:
        return self.fn.apply(*xs)


class ModuleLayer(nn.Module):
    def __init__(self, c: int, k: int, fn: type) -> None:
        super().__init__()
        self.bn1, self.relu1, self.conv1 = nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 2 * k, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(2 * k), nn.ReLU()
        self.conv2 = nn.Conv2d(2 * k, k, 3, padding=1, bias=False)
        self.cat = Cat(fn)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.relu2(self.bn2(self.conv1(self.relu1(self.bn1(x))))))
        return self.cat(x, out)


class FunctionalLayer(nn.Module):
    def __init__(self, c: int, k: int, fn: type) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, 2 * k, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(2 * k), nn.Conv2d(2 * k, k, 3, padding=1, bias=False)
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        return self.fn.apply(x, out)


class InplaceLayer(nn.Module):
    """torchvision's layer: in-place ReLU modules; the block hands it the list of features so far."""

    def __init__(self, c: int, k: int, fn: type, checkpointed: bool) -> None:
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c, 2 * k, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(2 * k), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * k, k, 3, padding=1, bias=False)
        self.fn, self.checkpointed = fn, checkpointed

    def bottleneck(self, *features: Tensor) -> Tensor:
        return self.conv1(self.relu1(self.norm1(self.fn.apply(*features))))

    def forward(self, *features: Tensor) -> Tensor:
        if self.checkpointed and any(f.requires_grad for f in features):
            out = cp.checkpoint(self.bottleneck, *features, use_reentrant=False)
        else:
            out = self.bottleneck(*features)
        return self.conv2(self.relu2(self.norm2(out)))


class InplaceBlock(nn.Module):
    def __init__(self, c: int, k: int, n: int, fn: type, checkpointed: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(InplaceLayer(c + i * k, k, fn, checkpointed) for i in range(n))
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(*features))
        return self.fn.apply(*features)


class Net(nn.Module):
    """A small DenseNet in one of the styles; ``top_level``: the last cat is the Function, in the model's own
    forward (between units)."""

    def __init__(self, style: str, fn: type = CatFn, k: int = 3, n: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        c = 2 * k
        self.style = style
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        if style.startswith("inplace"):
            self.block = InplaceBlock(c, k, n, fn, checkpointed=style == "inplace-checkpointed")
        else:
            layer = ModuleLayer if style == "module" else FunctionalLayer
            self.block = nn.Sequential(*[layer(c + i * k, k, fn) for i in range(n)])
        c += n * k
        self.side = nn.Conv2d(3, k, 3, padding=1, bias=False)
        self.fn = fn
        self.bn = nn.BatchNorm2d(c + k)
        self.fc = nn.Linear(c + k, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.fn.apply(self.block(self.stem(x)), self.side(x))  # in the model's own forward
        if self.style == "functional":  # the seed's head: squeezed log-probabilities
            out = torch.squeeze(F.avg_pool2d(F.relu(self.bn(out)), out.shape[-1]))
            return F.log_softmax(self.fc(out), dim=-1)
        out = F.relu(self.bn(out), inplace=self.style.startswith("inplace"))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


STYLES = ("module", "functional", "inplace", "inplace-checkpointed")
LOSS = {"functional": F.nll_loss}
# where the block's Functions run: the module whose forward applies them (k-th layer), and the top-level one
CALLS = {"module": ["block.0.cat", "block.1.cat"], "functional": ["block.0", "block.1"],
         "inplace": ["block.layers.0", "block.layers.1", "block"],
         "inplace-checkpointed": ["block.layers.0", "block.layers.1", "block"]}


def _net(style: str, fn: type = CatFn, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Net(style, fn)


def _batch(n: int = 4, seed: int = 0, size: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _diff(style: str, fn: type, a: str = "mkldnn", b: str = "native", seed: int = 0, n: int = 4) -> object:
    x, y = _batch(n, seed)
    return diff(_net(style, fn, seed), x, y, a, b, loss_fn=LOSS.get(style, F.cross_entropy))


def _fn_rows(report: object) -> list:
    return [r for r in report.rows if r.mode == functions.MODE]


# -- the planted fault is named at the Function ------------------------------------------------------------------
@pytest.mark.parametrize("style", STYLES)
def test_a_cat_backward_wrong_under_onednn_float32_is_a_backward_mismatch_at_that_function(style: str) -> None:
    report = _diff(style, OneDNNWrongCatFn)
    assert report.verdict == "mismatch", report.summary
    labels = {f"{m} · OneDNNWrongCatFn" for m in CALLS[style]} | {"(model) · OneDNNWrongCatFn"}
    rows = _fn_rows(report)
    assert {r.layer for r in rows} == labels  # every call is a unit, the top-level one too
    bad = {(r.layer, r.pass_, r.quantity, r.side) for r in rows if r.status in FAILING}
    assert bad == {(label, "backward", "grad_input", "a") for label in labels}  # mkldnn only, backward only
    first = report.first_divergence
    assert (first["mode"], first["pass"], first["quantity"], first["side"]) == ("function", "backward",
                                                                                "grad_input", "a"), first
    assert first["layer"] == "(model) · OneDNNWrongCatFn"  # the top-level cat's backward runs first
    assert report.summary.startswith("mismatch: mkldnn wrong at custom autograd Function OneDNNWrongCatFn in "
                                     "the model's own forward (backward grad_input, teacher-forced")
    # the modules that ran it fail too, stay visible, and are explained by the Function: the smaller unit
    for module in CALLS[style]:
        mine = [r for r in report.rows if r.mode == "local" and r.layer == module and r.status in FAILING]
        assert mine and all(r.pass_ == "backward" for r in mine)
        for r in mine:  # by its own Function, or (the block) by a failing layer inside it that a Function explains
            if r.explained_by == f"{module} · OneDNNWrongCatFn":
                assert f"explained by failing custom autograd Function OneDNNWrongCatFn in {module}" in r.note
            else:
                assert r.explained_by in CALLS[style] and r.explained_by.startswith(module + "."), r.explained_by
    assert all(r.status == Status.OK for r in report.rows if r.mode == "math")  # right in float64
    assert report.to_json()["first_divergence"]["mode"] == "function"


@pytest.mark.parametrize("style", ["functional", "inplace"])
def test_a_float32_side_against_a_float64_side_names_the_function(style: str) -> None:
    report = _diff(style, OneDNNWrongCatFn, a="fp64", b="mkldnn")
    assert report.verdict == "mismatch"
    first = report.first_divergence
    assert (first["mode"], first["pass"], first["side"]) == ("function", "backward", "b"), first
    assert all(r.ratio_a is not None and r.ratio_a <= 1 for r in _fn_rows(report))  # fp64 runs the right branch


def test_the_failing_function_leads_the_table() -> None:
    report = _diff("module", OneDNNWrongCatFn)
    lead = leading_rows(report, 5)
    assert lead[0].mode == "function" and lead[0].status == Status.MISMATCH
    moved = [r for r in report.rows if r.mode == "propagated" and r.status == Status.DOWNSTREAM]
    assert moved and all(r.note.endswith("explained by failing custom autograd Function OneDNNWrongCatFn in "
                                         "block.1.cat") for r in moved)  # the downstream rows name the Function


# -- correct Functions agree ---------------------------------------------------------------------------------------
@given(seed=st.integers(0, 10**4), n=st.integers(2, 5), style=st.sampled_from(STYLES))
@settings(max_examples=8, deadline=None)
def test_a_correct_cat_agrees_and_every_call_is_judged(seed: int, n: int, style: str) -> None:
    report = _diff(style, CatFn, seed=seed, n=n)
    assert report.verdict == "agree", report.summary
    rows = _fn_rows(report)
    calls = len(CALLS[style]) + 1
    assert len(rows) == 2 * calls  # forward output and backward grad_input of each call
    assert all(r.status == Status.OK and not r.note for r in rows), [(r.layer, r.note) for r in rows]
    assert all(0 <= r.ratio_a <= 1 and 0 <= r.ratio_b <= 1 for r in rows)
    # the bound is the generic one on the magnitudes of the terms, for the side's own precision
    assert all(r.tolerance > 0 and "custom autograd Function CatFn, replayed whole" in r.origin for r in rows)


def test_a_model_without_custom_functions_has_no_function_rows() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 10)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))

    x, y = _batch()
    report = diff(Plain(), x, y, "mkldnn", "native")
    assert report.verdict == "agree" and not _fn_rows(report)
    assert {r.mode for r in report.rows} <= {"local", "between", "propagated"}


# -- arguments, occurrences, forward faults, non-finite ------------------------------------------------------------
class Scaled(nn.Module):
    """One module applies ScaleFn twice with different float arguments; only the second (s = 0.5) is wrong."""

    def __init__(self, fn: type = ScaleFn, shift: type | None = None) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 10)
        self.fn, self.shift = fn, shift

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        if self.shift is not None:
            h = self.shift.apply(h)
        h = self.fn.apply(self.fn.apply(h, 2.0), 0.5)
        return self.fc(h.mean((2, 3)))


def test_calls_of_one_class_in_one_module_are_units_by_occurrence_with_their_arguments() -> None:
    x, y = _batch()
    torch.manual_seed(0)
    report = diff(Scaled(), x, y, "mkldnn", "native")
    rows = _fn_rows(report)
    assert {r.layer for r in rows} == {"(model) · ScaleFn", "(model) · ScaleFn#2"}
    bad = {(r.layer, r.pass_) for r in rows if r.status in FAILING}
    assert bad == {("(model) · ScaleFn#2", "backward")}  # only the call with s = 0.5
    assert report.first_divergence["layer"] == "(model) · ScaleFn#2"


def test_a_wrong_forward_is_a_forward_mismatch_at_the_function() -> None:
    x, y = _batch()
    torch.manual_seed(0)
    report = diff(Scaled(shift=ShiftFn), x, y, "mkldnn", "native")
    first = report.first_divergence
    assert (first["layer"], first["pass"], first["quantity"], first["mode"]) == ("(model) · ShiftFn", "forward",
                                                                                  "output", "function")


def test_a_nan_from_a_functions_backward_is_nonfinite_at_the_function() -> None:
    x, y = _batch()
    torch.manual_seed(0)
    report = diff(Scaled(shift=NanGradFn), x, y, "mkldnn", "native")
    row = next(r for r in _fn_rows(report) if r.layer == "(model) · NanGradFn" and r.pass_ == "backward")
    assert row.status == Status.NONFINITE and row.side == "a"
    assert report.verdict == "mismatch"


def test_local_check_has_the_function_rows_too() -> None:
    x, y = _batch()
    rows = local_check(_net("functional", OneDNNWrongCatFn), x, y, "mkldnn", loss_fn=F.nll_loss)
    bad = [r for r in rows if r.mode == functions.MODE and r.status in FAILING]
    assert {r.layer for r in bad} == {"block.0 · OneDNNWrongCatFn", "block.1 · OneDNNWrongCatFn",
                                      "(model) · OneDNNWrongCatFn"}


class IdentityFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g


class Float32Only(nn.Module):
    """Applies a Function only when the activations are float32: the float64 oracle never does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        if h.dtype == torch.float32:
            h = IdentityFn.apply(h)
        return self.fc(h.mean((2, 3)))


def test_a_call_on_one_side_only_is_listed_never_dropped() -> None:
    x, y = _batch()
    torch.manual_seed(0)
    report = diff(Float32Only(), x, y, "fp64", "mkldnn")
    (row,) = _fn_rows(report)
    assert row.layer == "(model) · IdentityFn" and row.status == Status.OK
    assert row.ratio_a is None and row.ratio_b == 0  # side b (float32) only
    assert "applied on this side only" in row.note
    assert report.verdict == "agree"  # an identity: nothing changed (the between rows say so)


class DropFn(torch.autograd.Function):
    """A dropout written by hand: its mask comes from torch's generator and is saved for backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        mask = (torch.rand_like(x) > 0.5).to(x.dtype)
        ctx.save_for_backward(mask)
        return x * mask * 2

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (mask,) = ctx.saved_tensors
        return g * mask * 2


def test_a_function_that_draws_random_numbers_is_a_note_not_a_false_alarm() -> None:
    x, y = _batch()
    torch.manual_seed(0)
    report = diff(Scaled(fn=ScaleFn, shift=DropFn), x, y, "mkldnn", "fp64")
    rows = [r for r in _fn_rows(report) if r.layer == "(model) · DropFn"]
    assert len(rows) == 1 and rows[0].status == Status.OK and "draws random numbers" in rows[0].note
    assert all(r.status not in FAILING for r in _fn_rows(report) if r.layer != "(model) · ScaleFn#2")


# -- recording ---------------------------------------------------------------------------------------------------
class ReentrantNet(nn.Module):
    """A Function inside a reentrant checkpoint: its forward runs without grad, its node comes from the recompute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(6, 10)

    def inner(self, a: Tensor, b: Tensor) -> Tensor:
        return F.relu(CatFn.apply(a, b))

    def forward(self, x: Tensor) -> Tensor:
        h = cp.checkpoint(self.inner, self.conv1(x), self.conv2(x), use_reentrant=True)
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("model", ["inplace-checkpointed", "reentrant"])
def test_a_checkpoints_recompute_names_no_new_call_and_the_backward_is_recorded(model: str) -> None:
    torch.manual_seed(0)
    net = _net(model) if model != "reentrant" else ReentrantNet()
    x, y = _batch()
    with functions.recording(net, values=True) as rec:
        F.cross_entropy(net(x), y).backward()
    expected = (["block.layers.0", "block.layers.1", "block", ""] if model != "reentrant" else [""])
    assert [c.module for c in rec.calls] == expected
    for c in rec.calls:
        assert c.grad_outputs is not None and c.grad_inputs is not None
        assert len(c.grad_inputs) == len(c.inputs) and all(
            g is None or g.shape == t.shape for g, t in zip(c.grad_inputs, c.inputs))


def test_a_side_records_layouts_and_dtypes_only_and_unused_gradients_are_none() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(7, 10)

        def forward(self, x: Tensor) -> Tensor:
            h = CatFn.apply(self.conv(x), x.contiguous(memory_format=torch.channels_last))  # x needs no grad
            return self.fc(h.mean((2, 3)))

    torch.manual_seed(0)
    net, (x, y) = M(), _batch()
    with functions.recording(net, values=False) as rec:
        F.cross_entropy(net(x), y).backward()
    (call,) = rec.calls
    assert call.needs == [True, False] and call.grad_inputs == [None, None]  # a side keeps no values
    assert all(t.device.type == "meta" for t in call.inputs)
    assert call.input_layouts[1].stride == x.contiguous(memory_format=torch.channels_last).stride()
    assert call.grad_output_layouts[0] is not None
    with functions.recording(net, values=True) as rec:
        F.cross_entropy(net(x), y).backward()
    (call,) = rec.calls
    assert call.grad_inputs[0] is not None and call.grad_inputs[1] is None  # x's gradient is not used


# -- kinks inside a Function -------------------------------------------------------------------------------------
class SubReluFn(torch.autograd.Function):
    """relu(a - b) with a hand-written backward (the mask of ``a - b > 0``); ``wrong``: under oneDNN float32 the
    gradient of ``a`` is doubled."""

    wrong = False

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        d = a - b
        ctx.save_for_backward(d)
        return F.relu(d)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple:
        (d,) = ctx.saved_tensors
        m = g * (d > 0)
        return (2 * m if SubReluFn.wrong and _onednn_float32(g) else m), -m


class KinkNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.one = nn.Parameter(torch.ones(()))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = x * self.one  # exact in every dtype: the Function sees the inputs as given
        return self.fc(SubReluFn.apply(h[:, :1], h[:, 1:]).flatten(1))


@pytest.fixture
def wrong_sub_relu():
    SubReluFn.wrong = True
    yield
    SubReluFn.wrong = False


def _kink_batch(seed: int = 0, at_boundary: bool = True) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64, generator=g)
    if at_boundary:  # a - b = 2^-30 > 0 in float64; both round to 1.0 in float32, where relu's mask is 0
        x[0, 0, 0, 0], x[0, 1, 0, 0] = 1 + 2.0 ** -30, 1.0
    return x, torch.randint(0, 10, (4,), generator=g)


def test_a_relu_inside_a_function_that_takes_the_other_branch_is_a_kink_not_a_finding() -> None:
    x, y = _kink_batch()
    torch.manual_seed(0)
    report = diff(KinkNet(), x, y, "mkldnn", "native")
    assert report.verdict == "agree", report.summary
    row = next(r for r in _fn_rows(report) if r.pass_ == "backward")
    assert row.status == Status.KINK and row.worst_ratio > 1e3  # the gradient jumps by |g| there
    assert "kink inside the Function" in row.note and "at 1 element(s)" in row.note
    torch.manual_seed(0)
    strict = diff(KinkNet(), x, y, "mkldnn", "native", fail_on="kink")
    assert strict.verdict == "mismatch"


@pytest.mark.parametrize("at_boundary", [False, True])
def test_a_wrong_backward_of_a_function_with_a_relu_inside_is_still_caught(wrong_sub_relu, at_boundary: bool) -> None:
    x, y = _kink_batch(at_boundary=at_boundary)
    torch.manual_seed(0)
    report = diff(KinkNet(), x, y, "mkldnn", "native")
    first = report.first_divergence
    if not at_boundary:
        assert (first["layer"], first["pass"], first["mode"], first["side"]) == (
            "(model) · SubReluFn", "backward", "function", "a"), report.summary
    else:  # a kink in the same call excuses its backward rows; the fault still fails the diff downstream
        assert report.verdict == "mismatch", report.summary


# -- a matrix product inside a Function: its operands take autocast's (and TF32's) rounding ------------------------
class LinearFn(torch.autograd.Function):
    """``x @ w.T`` with its backward written by hand."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple:
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x


class LinearHead(nn.Module):
    """The Function gets float32 features (under bf16 autocast too) and multiplies them in autocast's dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.w = nn.Parameter(torch.randn(10, 16) / 4)

    def forward(self, x: Tensor) -> Tensor:
        return LinearFn.apply(F.relu(self.conv(x)).mean((2, 3)).to(self.w.dtype), self.w)


@given(seed=st.integers(0, 10**4))
@settings(max_examples=3, deadline=None)
def test_a_matmul_inside_a_function_is_bounded_with_autocasts_operand_rounding(seed: int) -> None:
    torch.manual_seed(seed)
    x, y = _batch(8, seed)
    report = diff(LinearHead(), x, y, "bf16", "native")
    assert report.verdict == "agree", report.summary  # with float32's u for the operands: ratio ~650
    rows = [r for r in _fn_rows(report) if r.ratio_a is not None]
    assert rows and all("u_op=2^-8" in r.origin for r in rows)  # bf16 operands, though the inputs are float32


@pytest.mark.gpu
@pytest.mark.parametrize("a", ["cudnn", "tf32", "cudnn+channels_last", "bf16"])
def test_functions_on_cuda_agree_with_their_own_precision(a: str) -> None:
    for model, loss in ((_net("inplace-checkpointed"), F.cross_entropy), (_net("functional"), F.nll_loss)):
        x, y = _batch()
        report = diff(model, x, y, a, "no-cudnn", device="cuda", loss_fn=loss)
        assert report.verdict == "agree", report.summary
        assert _fn_rows(report)
    torch.manual_seed(0)
    x, y = _batch(8)
    assert diff(LinearHead(), x, y, a, "no-cudnn", device="cuda").verdict == "agree"


# -- the command line --------------------------------------------------------------------------------------------
def wrong_functional() -> nn.Module:
    """Factory for the CLI test: the functional style with the cat wrong under oneDNN float32."""
    return _net("functional", OneDNNWrongCatFn)


def test_the_cli_names_the_function_in_its_verdict_table_and_json(capsys, tmp_path) -> None:
    out_json = tmp_path / "diff.json"
    argv = ["diff", "--model", f"{Path(__file__)}:wrong_functional", "--input-shape", "3,6,6", "--num-classes", "10",
            "--batch", "4", "--a", "mkldnn", "--b", "native", "--json", str(out_json)]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert ("mkldnn wrong at custom autograd Function OneDNNWrongCatFn in the model's own forward (backward "
            "grad_input") in out
    assert "(model) · OneDNNWrongCatFn" in out and "function" in out  # the failing row leads the table
    data = json.loads(out_json.read_text())
    assert data["first_divergence"]["mode"] == "function"
    rows = [r for r in data["rows"] if r["mode"] == "function"]
    assert {r["layer"] for r in rows} == {"block.0 · OneDNNWrongCatFn", "block.1 · OneDNNWrongCatFn",
                                          "(model) · OneDNNWrongCatFn"}
