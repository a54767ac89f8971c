"""The between-units check: the code outside leaf units, forward and backward, on each side's own values.

User models written here in the styles users write them: functional (the seed's ``F.relu`` and
``torch.cat((x, out), 1)`` in a forward, squeezed log-probabilities), torchvision (``nn.ReLU(inplace=True)``,
a list of features concatenated inside a layer, a checkpointed bottleneck, an in-place ``F.relu`` before the
pool), a module called twice, and the between-units fault of issue 12: a custom Function in a forward,
outside every leaf unit, whose backward scales one gradient channel (float32 only, or every dtype).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from densenet_debug.reference.check import check_reference
from densenet_debug.reference.record import record_reference
from densenet_debug.verdict.between import rounding
from densenet_debug.verdict.engine import diff
from densenet_debug.verdict.propagated import explain_by_local
from densenet_debug.verdict.report import Row, Status

pytest_plugins = ["pytester"]


# -- the planted fault: a custom Function outside every leaf unit ------------------------------------------
class ScaleChannelGrad(torch.autograd.Function):
    """Identity forward; backward multiplies gradient channel 3 by ``scale`` (in float32 only, or in every
    dtype with ``every_dtype``). ``scale = 1`` is correct."""

    scale = 1.0
    every_dtype = False

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        g = g.clone()
        if ScaleChannelGrad.every_dtype or g.dtype == torch.float32:
            g[:, 3] *= ScaleChannelGrad.scale
        return g


class ShiftChannel(torch.autograd.Function):
    """Forward adds ``shift`` to channel 1 in float32 only (a wrong forward between units); backward identity."""

    shift = 0.0

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        t = t.clone()
        if t.dtype == torch.float32:
            t[:, 1] += ShiftChannel.shift
        return t

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g


@pytest.fixture
def planted():
    """Set the faults' knobs for one test and put them back."""
    saved = (ScaleChannelGrad.scale, ScaleChannelGrad.every_dtype, ShiftChannel.shift)

    def plant(scale: float = 1.0, every_dtype: bool = False, shift: float = 0.0) -> None:
        ScaleChannelGrad.scale, ScaleChannelGrad.every_dtype, ShiftChannel.shift = scale, every_dtype, shift

    yield plant
    ScaleChannelGrad.scale, ScaleChannelGrad.every_dtype, ShiftChannel.shift = saved


# -- user models -----------------------------------------------------------------------------------------
class TopLevel(nn.Module):
    """Issue 12's model: the Function sits in the top-level forward between conv2 and the cat."""

    def __init__(self, num_classes: int = 10, bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(14)
        self.fc = nn.Linear(14, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(self.conv1(x)))
        b = ScaleChannelGrad.apply(ShiftChannel.apply(self.conv2(a)))
        h = torch.cat([a, b], 1)
        h = F.relu(self.bn2(h))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class FunctionalLayer(nn.Module):
    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, 4 * k, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(4 * k), nn.Conv2d(4 * k, k, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = ScaleChannelGrad.apply(self.conv2(F.relu(self.bn2(out))))
        return torch.cat((x, out), 1)


class Functional(nn.Module):
    """The seed's style: functional ReLUs, cat in the layer's forward, squeezed log-probabilities."""

    def __init__(self, k: int = 4, n: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        c = 2 * k
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        layers = []
        for _ in range(n):
            layers.append(FunctionalLayer(c, k))
            c += k
        self.dense = nn.Sequential(*layers)
        self.bn, self.fc = nn.BatchNorm2d(c), nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.dense(self.conv(x))
        out = torch.squeeze(F.avg_pool2d(F.relu(self.bn(out)), out.shape[-1]))
        return F.log_softmax(self.fc(out), dim=-1)


class TorchvisionLayer(nn.Module):
    def __init__(self, c: int, k: int, efficient: bool) -> None:
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c, 4 * k, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(4 * k), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4 * k, k, 3, padding=1, bias=False)
        self.efficient = efficient

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        return self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))

    def forward(self, *prev_features: Tensor) -> Tensor:
        inputs = list(prev_features)
        if self.efficient and any(t.requires_grad for t in inputs):
            def closure(*inputs: Tensor) -> Tensor:
                return self.bn_function(list(inputs))

            bottleneck = cp.checkpoint(closure, *inputs, use_reentrant=False)
        else:
            bottleneck = self.bn_function(inputs)
        return ScaleChannelGrad.apply(self.conv2(self.relu2(self.norm2(bottleneck))))


class TorchvisionBlock(nn.Module):
    def __init__(self, c: int, k: int, n: int, efficient: bool) -> None:
        super().__init__()
        for i in range(n):
            self.add_module(f"denselayer{i + 1}", TorchvisionLayer(c + i * k, k, efficient))

    def forward(self, init: Tensor) -> Tensor:
        features = [init]
        for layer in self.children():
            features.append(layer(*features))
        return torch.cat(features, 1)


class Torchvision(nn.Module):
    """torchvision's style: in-place ReLU modules, list cat, optional checkpoint, in-place F.relu at the end."""

    def __init__(self, k: int = 4, n: int = 3, num_classes: int = 10, efficient: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, 2 * k, 3, padding=1, bias=False))
        self.features.add_module("denseblock1", TorchvisionBlock(2 * k, k, n, efficient))
        self.features.add_module("norm5", nn.BatchNorm2d(2 * k + n * k))
        self.classifier = nn.Linear(2 * k + n * k, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))


class CalledTwice(nn.Module):
    """One ReLU module called three times and one average pool called twice in a forward, and residual sums
    (between code that rounds). A conv called twice is left out here (its second call would be between code
    with a conv's bound): tests/verdict/test_verdict.py has one."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.bn(self.conv0(x)))
        h = h + 0.5 * self.relu(self.pool(h))
        h = self.relu(self.pool(self.conv1(h))) + h
        return self.fc(self.relu(h).mean((2, 3)))


def _batch(n: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _build(cls: type, seed: int = 0, **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kw)


STYLES = {"top-level": (TopLevel, {}), "functional": (Functional, {}), "torchvision": (Torchvision, {}),
          "torchvision-checkpointed": (Torchvision, {"efficient": True}), "called-twice": (CalledTwice, {})}


def _between(report: object) -> list[Row]:
    return [r for r in report.rows if r.mode == "between"]


# -- correct models agree ----------------------------------------------------------------------------------
@pytest.mark.parametrize("style", sorted(STYLES))
def test_correct_models_agree_and_every_unit_is_checked_between(style: str) -> None:
    cls, kw = STYLES[style]
    x, y = _batch()
    report = diff(_build(cls, **kw), x, y, "mkldnn", "native")
    assert report.verdict == "agree", report.summary
    rows = _between(report)
    assert {r.pass_ for r in rows} == {"forward", "backward"}
    assert all(r.status == Status.OK and r.ratio_a <= 1 and r.ratio_b <= 1 for r in rows)
    if style.startswith("torchvision"):  # the in-place ReLUs run as between code and are still checked
        assert {("features.denseblock1.denselayer2.relu1", "input"),
                ("features.denseblock1.denselayer2.relu1", "grad_output")} <= {(r.layer, r.quantity) for r in rows}


def test_code_that_rounds_gets_a_derived_bound_and_exact_code_none() -> None:
    x, y = _batch()
    rows = _between(diff(_build(CalledTwice), x, y, "mkldnn", "native"))
    exact = [r for r in rows if r.tolerance == 0]
    rounding_rows = [r for r in rows if r.tolerance > 0]
    assert exact and rounding_rows  # a relu handing a bn's output on is exact, the residual sums round
    assert all(r.error_a == 0 and r.error_b == 0 for r in exact)
    assert all(r.tolerance < 1e-5 for r in rounding_rows)  # a few float32 roundings of sum|terms|, no more


@given(seed=st.integers(0, 10**4), n=st.integers(2, 5), style=st.sampled_from(sorted(STYLES)))
@settings(max_examples=6, deadline=None)
def test_no_false_alarm_across_seeds_and_batches(seed: int, n: int, style: str) -> None:
    cls, kw = STYLES[style]
    x, y = _batch(n, seed)
    report = diff(_build(cls, seed=seed, **kw), x, y, "mkldnn", "native")
    assert all(r.status == Status.OK for r in _between(report)), report.summary


# -- the between-units fault --------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [2.0, 0.0, 1.001])
def test_fp32_only_fault_in_the_top_level_forward_is_a_mismatch_between_its_units(planted, scale: float) -> None:
    planted(scale=scale)
    x, y = _batch()
    report = diff(_build(TopLevel), x, y, "mkldnn", "native")
    assert report.verdict == "mismatch"
    first = report.first_divergence  # the Function is a unit of its own (verdict.functions), named first
    assert (first["layer"], first["pass"], first["quantity"], first["mode"], first["side"]) == (
        "(model) · ScaleChannelGrad", "backward", "grad_input", "function", "both")
    row = next(r for r in _between(report) if r.layer == "conv2" and r.quantity == "grad_output")
    assert row.status == Status.MISMATCH and row.side == "both"
    assert "between conv2 and bn2" in row.note and "model's own forward (TopLevel)" in row.note
    assert all(r.status == Status.OK for r in report.rows if r.mode == "local")  # every unit is right


def test_a_wrong_forward_between_units_is_named_at_the_consuming_unit(planted) -> None:
    planted(shift=1e-3)
    x, y = _batch()
    report = diff(_build(TopLevel), x, y, "mkldnn", "native")
    first = report.first_divergence  # the Function is a unit of its own (verdict.functions), named first
    assert (first["layer"], first["pass"], first["quantity"], first["mode"]) == ("(model) · ShiftChannel",
                                                                                  "forward", "output", "function")
    row = next(r for r in _between(report) if r.layer == "bn2" and r.quantity == "input")
    assert row.status == Status.MISMATCH
    assert "between bn1, conv2 and bn2" in row.note


@pytest.mark.parametrize("style", ["functional", "torchvision", "torchvision-checkpointed"])
def test_fp32_only_fault_inside_a_dense_layer_is_localized_in_every_style(planted, style: str) -> None:
    """The Function sits in a dense layer's forward, which also concatenates: the layer is a composite unit
    whose whole replay fails (local), and the between row names the conv whose grad_output it corrupts."""
    planted(scale=1.01)
    cls, kw = STYLES[style]
    x, y = _batch()
    report = diff(_build(cls, **kw), x, y, "mkldnn", "native")
    assert report.verdict == "mismatch", report.summary
    bad = [r for r in _between(report) if r.status == Status.MISMATCH]
    assert bad and all(r.quantity == "grad_output" and r.layer.endswith(".conv2") for r in bad)
    layers = {r.layer.rpartition(".")[0] for r in bad}
    first = report.first_divergence
    assert first["layer"] in {f"{layer} · ScaleChannelGrad" for layer in layers}, report.summary  # its own unit
    for r in bad:
        layer = r.layer.rpartition(".")[0]
        assert r.note.startswith(f"between {r.layer} and ")
        assert any(f"the backward of the code {w} '{layer}'" in r.note for w in ("in", "from"))


def test_propagated_rows_moved_by_a_between_fault_are_downstream_of_it(planted) -> None:
    planted(scale=3.0)
    x, y = _batch()
    report = diff(_build(TopLevel, bias=False), x, y, "mkldnn", "native")
    moved = [r for r in report.rows if r.mode == "propagated" and r.status != Status.OK]
    assert all(r.status == Status.DOWNSTREAM for r in moved)  # not ok, and not a finding of their own
    assert moved and all(r.note == "downstream of the between-units failure at conv2 (backward grad_output)"
                         and r.explained_by == "conv2" for r in moved)
    assert {r.layer for r in moved} >= {"conv2", "conv1"}
    assert report.first_divergence["mode"] == "function"  # the Function itself, a unit (verdict.functions)


# -- against a recorded fixture: the fault in every dtype ---------------------------------------------------
def test_every_dtype_fault_against_a_fixture_is_a_mismatch_between_its_units(planted, tmp_path) -> None:
    x, y = _batch()
    model = _build(TopLevel)
    path = record_reference(model, x, y, tmp_path / "top", name="top")
    assert check_reference(path, "mkldnn", model=model).verdict == "agree"
    for scale in (2.0, 0.0, 1.001):
        planted(scale=scale, every_dtype=True)
        result = check_reference(path, "mkldnn", model=model)
        assert result.verdict == "mismatch", (scale, result.summary)
        first = result.first_divergence
        # the fixture stores the Function's own truth (schema 3): the Function, the smaller unit, is named first,
        # and the stored truth's between row at conv2 still fails, explained by it
        assert (first["layer"], first["quantity"], first["mode"]) == (
            "(model) · ScaleChannelGrad", "grad_input", "function"), result.summary
        assert "custom autograd Function ScaleChannelGrad in the model's own forward" in result.summary
        between = [r for r in result.reproduction if r.status == "mismatch"]
        assert [(r.layer, r.quantity, r.mode) for r in between] == [("conv2", "grad_output", "between")]
        assert between[0].explained_by == "(model) · ScaleChannelGrad"
    planted(scale=1.0, every_dtype=True)
    assert check_reference(path, "native", model=model).verdict == "agree"


# -- the pieces --------------------------------------------------------------------------------------------
def test_rounding_counts_of_ops() -> None:
    a, b = torch.randn(4, 6, 5, 5), torch.randn(4, 6, 5, 5)
    aten = torch.ops.aten
    assert rounding(aten.cat.default, [a, b], [torch.cat([a, b], 1)]) == 0
    assert rounding(aten.relu.default, [a], [a.relu()]) == 0
    assert rounding(aten.threshold_backward.default, [a, b], [a]) == 0
    assert rounding(aten.add.Tensor, [a, b], [a + b]) == 1
    assert rounding(aten.add_.Tensor, [a, b], [a]) == 1
    assert rounding(aten.sigmoid.default, [a], [a.sigmoid()]) == 4  # 1/(1+exp(-x)): a composition
    s = a.sum((2, 3))
    assert rounding(aten.sum.dim_IntList, [a], [s]) == 25 + 1  # K = 25 terms per result, then one more
    conv_out = torch.randn(4, 6, 5, 5)
    assert rounding(aten.convolution.default, [a, b[:1]], [conv_out]) == a.numel() + b[:1].numel()  # generic


def _row(layer: str, pass_: str, order: int, status: Status, mode: str = "local") -> Row:
    return Row(layer=layer, pass_=pass_, quantity="q", error_a=1.0, error_b=None, tolerance=0.1, status=status,
               origin="", mode=mode, order=order)


def test_only_upstream_failures_explain_a_propagated_row() -> None:
    later = _row("late", "forward", 7, Status.MISMATCH)
    rows = [_row("early", "forward", 2, Status.MISMATCH, "propagated"),
            _row("early-grad", "backward", 1, Status.MISMATCH, "propagated")]
    explain_by_local(rows, [later])
    assert [r.explained_by for r in rows] == [None, "late"]  # a later forward failure moves every gradient
    assert [r.status for r in rows] == [Status.MISMATCH, Status.DOWNSTREAM]
    between = _row("mid", "backward", 0, Status.MISMATCH, "between")
    fresh = [_row("x", "backward", 3, Status.MISMATCH, "propagated")]
    explain_by_local(fresh, [between])
    assert fresh[0].explained_by == "mid" and fresh[0].status == Status.DOWNSTREAM
    assert fresh[0].note == "downstream of the between-units failure at mid (backward q)"
    assert math.isfinite(fresh[0].error_a)


# -- the pytest plugin, as a user meets it ------------------------------------------------------------------
PLUGIN_TEST = '''
import os

import torch
import torch.nn.functional as F
from torch import nn


class ScaleChannelGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[:, 3] *= float(os.environ.get("BETWEEN_SCALE", "1"))  # in every dtype
        return g


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(14)
        self.fc = nn.Linear(14, 10)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        h = torch.cat([a, ScaleChannelGrad.apply(self.conv2(a))], 1)
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn2(h)), 1).flatten(1))


def test_net(grad_reference):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    grad_reference.check(Net(), x, name="between-net", backend=["native"])
'''


def test_the_plugin_fails_a_fixture_whose_between_code_changed_in_every_dtype(pytester: pytest.Pytester,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._dynamo  # noqa: F401  (imported once, outside the inner runs: see tests/reference)

    args = ("-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest")
    monkeypatch.delenv("BETWEEN_SCALE", raising=False)
    pytester.makepyfile(test_user=PLUGIN_TEST)
    pytester.runpytest(*args, "--update-reference").assert_outcomes(passed=1)
    pytester.runpytest(*args).assert_outcomes(passed=1)
    for scale in ("2", "0", "1.001"):
        monkeypatch.setenv("BETWEEN_SCALE", scale)
        result = pytester.runpytest(*args)
        result.assert_outcomes(failed=1)
        out = result.stdout.str()
        assert ("mismatch: native diverges from reference between-net first at custom autograd Function "
                "ScaleChannelGrad in the model's own forward (backward grad_input, function, step 0)") in out
        assert ("conv2 (backward, between): stored truth vs the model's code" in out
                and "explained by failing custom autograd Function ScaleChannelGrad" in out)


def test_the_check_never_writes_into_the_records_it_reads() -> None:
    """A float64 side (or a fixture's stored truth) hands its own tensors over: nothing may alias them."""
    from densenet_debug import build_model
    from densenet_debug.models.copies import fp64_copy
    from densenet_debug.verdict.between import between_rows
    from densenet_debug.verdict.engine import oracle_traces

    x, y = _batch()
    torch.manual_seed(0)
    model = build_model("densenet-bc-10")  # Concat units: one feature map handed to several units
    (trace,) = oracle_traces(model, x, y, keep_graph=False)
    records = [t for rec in trace for t in (*rec.inputs, *rec.outputs, *rec.grad_inputs, *rec.grad_outputs)
               if t is not None]
    before = [t.clone() for t in records]
    rows = between_rows(0, trace.forward_order, trace, fp64_copy(model, "cpu").train(), x.double(), y, None,
                        F.cross_entropy)
    assert rows and all(r.status == Status.OK for r in rows)
    assert all(torch.equal(a, b) for a, b in zip(records, before))
