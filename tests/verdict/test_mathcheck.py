"""The math check: custom autograd Functions in user models, their backward against float64 finite differences.

Models are written the way users write them: functional (``F.relu`` and the concatenation in the layer's
forward, a squeezed log-softmax output) and torchvision style (``nn.ReLU(inplace=True)``, a list of features
concatenated in a checkpointed bottleneck, an in-place ``F.relu`` before the pool); the concatenation is a
custom autograd Function given to the model, correct or planted wrong.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from densenet_debug.cli import main
from densenet_debug.gradcheck import gradcheck_model
from densenet_debug.verdict import mathcheck
from densenet_debug.verdict.engine import diff
from densenet_debug.verdict.report import FAILING, Status


# -- custom Functions -------------------------------------------------------------------------------------
class CatFn(torch.autograd.Function):
    """torch.cat along channels, with a hand-written backward that hands each input its slice."""

    @staticmethod
    def forward(ctx, *features: Tensor) -> Tensor:
        ctx.sizes = [f.shape[1] for f in features]
        return torch.cat(features, 1)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple:
        return tuple(g.split(ctx.sizes, 1))


class WrongCatFn(CatFn):
    """Every dtype: the first input's slice is handed to the samples in the wrong order (rolled by one)."""

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple:
        first, *rest = g.split(ctx.sizes, 1)
        return (first.roll(1, 0), *rest)


class OneDNNFloat32WrongCatFn(CatFn):
    """Wrong only where oneDNN is on and the gradient is float32: a backend's fault, right in float64."""

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple:
        parts = list(g.split(ctx.sizes, 1))
        if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and g.dtype == torch.float32:
            parts[0] = parts[0].roll(1, 0)
        return tuple(parts)


class ScaledReluFn(torch.autograd.Function):
    """2 relu(x) in the new style (forward without ctx, setup_context): a correct Function with a kink inside."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return 2 * F.relu(x)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:  # noqa: ANN001
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * g * (x > 0)


class SwishFn(torch.autograd.Function):
    """x sigmoid(x) with its derivative written by hand: correct and smooth."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * (s + x * s * (1 - s))


# -- user models ----------------------------------------------------------------------------------------------
class FunctionalLayer(nn.Module):
    def __init__(self, c: int, k: int, cat: type, act: type | None) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, 4 * k, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(4 * k), nn.Conv2d(4 * k, k, 3, padding=1, bias=False)
        self.cat, self.act = cat, act

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.bn2(out)
        out = self.act.apply(out) if self.act is not None else F.relu(out)
        return self.cat.apply(x, self.conv2(out))


class Functional(nn.Module):
    def __init__(self, cat: type = CatFn, act: type | None = None, k: int = 4, n: int = 3,
                 num_classes: int = 10) -> None:
        super().__init__()
        c = 2 * k
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        layers = []
        for _ in range(n):
            layers.append(FunctionalLayer(c, k, cat, act))
            c += k
        self.dense = nn.Sequential(*layers)
        self.bn, self.fc = nn.BatchNorm2d(c), nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.dense(self.stem(x))
        out = torch.squeeze(F.avg_pool2d(F.relu(self.bn(out)), out.shape[-1]))
        return F.log_softmax(self.fc(out), dim=-1)


class TorchvisionLayer(nn.Module):
    def __init__(self, c: int, k: int, cat: type, act: type | None) -> None:
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c, 4 * k, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(4 * k), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4 * k, k, 3, padding=1, bias=False)
        self.cat, self.act = cat, act

    def bottleneck(self, *features: Tensor) -> Tensor:
        return self.conv1(self.relu1(self.norm1(self.cat.apply(*features))))

    def forward(self, *features: Tensor) -> Tensor:
        if any(f.requires_grad for f in features):
            out = cp.checkpoint(self.bottleneck, *features, use_reentrant=False)
        else:
            out = self.bottleneck(*features)
        out = self.norm2(out)
        out = self.act.apply(out) if self.act is not None else self.relu2(out)
        return self.conv2(out)


class Torchvision(nn.Module):
    def __init__(self, cat: type = CatFn, act: type | None = None, k: int = 4, n: int = 3,
                 num_classes: int = 10) -> None:
        super().__init__()
        c = 2 * k
        self.conv0 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.layers = nn.ModuleList()
        for _ in range(n):
            self.layers.append(TorchvisionLayer(c, k, cat, act))
            c += k
        self.norm, self.classifier = nn.BatchNorm2d(c), nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = [self.conv0(x)]
        for layer in self.layers:
            features.append(layer(*features))
        out = F.relu(self.norm(torch.cat(features, 1)), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


STYLES = {"functional": (Functional, F.nll_loss, "dense.1"), "torchvision": (Torchvision, F.cross_entropy,
                                                                             "layers.1")}


def _model(style: str, cat: type = CatFn, act: type | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return STYLES[style][0](cat, act)


def _batch(n: int = 4, seed: int = 0, size: int = 8) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def wrong_functional() -> nn.Module:
    """Factory for the CLI test: the functional model with a cat backward wrong in every dtype."""
    return _model("functional", WrongCatFn)


# -- diff ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", list(STYLES))
def test_a_cat_backward_wrong_in_every_dtype_is_math_at_that_function(style: str) -> None:
    x, y = _batch()
    report = diff(_model(style, WrongCatFn), x, y, "mkldnn", "native", loss_fn=STYLES[style][1])
    assert report.verdict == "mismatch"
    first = report.first_divergence
    layer = "dense.0" if style == "functional" else "layers.0"
    assert (first["status"], first["layer"], first["pass"], first["side"]) == ("math", layer, "backward", "both")
    assert "WrongCatFn" in first["quantity"]
    assert "WrongCatFn in " + layer in report.summary and report.summary.startswith("mismatch: math")
    math_rows = [r for r in report.rows if r.mode == "math"]
    assert len(math_rows) == 3 and all(r.status == Status.MATH for r in math_rows)
    assert all(r.status not in FAILING for r in report.rows if r.mode != "math")  # every backend shares it
    assert report.to_json()["first_divergence"]["status"] == "math"


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("act", [ScaledReluFn, SwishFn], ids=["relu-inside", "swish"])
def test_correct_custom_functions_are_verified_and_agree(style: str, act: type) -> None:
    x, y = _batch(seed=1)
    report = diff(_model(style, CatFn, act), x, y, "mkldnn", "native", loss_fn=STYLES[style][1])
    assert report.verdict == "agree", report.summary
    rows = [r for r in report.rows if r.mode == "math"]
    assert {r.quantity.split()[0] for r in rows} == {"CatFn", act.__name__}
    assert all(r.status == Status.OK for r in rows)
    verified = [r for r in rows if not r.note]
    assert len(verified) >= 5, [r.note for r in rows]  # 3 cats and at least 2 of the 3 activations
    assert report.settings["math_check"]["wrong"] == 0 and "math check:" in report.summary


def test_no_math_check_skips_it() -> None:
    x, y = _batch()
    report = diff(_model("functional", WrongCatFn), x, y, "mkldnn", "native", loss_fn=F.nll_loss, math_check=False)
    assert report.verdict == "agree"  # the bug is in every dtype: only the math check sees it
    assert not [r for r in report.rows if r.mode == "math"] and "math_check" not in report.settings


def test_cli_reports_math_with_exit_1_and_skips_it_with_no_math_check(capsys) -> None:
    argv = ["diff", "--model", f"{Path(__file__)}:wrong_functional", "--input-shape", "3,8,8", "--batch", "4",
            "--a", "mkldnn", "--b", "native"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "WrongCatFn in dense.0" in out and "math" in out
    assert main([*argv, "--no-math-check"]) == 0


@pytest.mark.parametrize("style", list(STYLES))
def test_a_cat_backward_wrong_only_under_onednn_float32_is_a_backward_mismatch_at_its_module(style: str) -> None:
    x, y = _batch()
    report = diff(_model(style, OneDNNFloat32WrongCatFn), x, y, "mkldnn", "native", loss_fn=STYLES[style][1])
    first = report.first_divergence
    prefix = "dense" if style == "functional" else "layers"
    assert report.verdict == "mismatch"
    # every layer holds the Function; the last one's backward runs first; the Function is the smaller unit
    assert (first["layer"], first["pass"], first["side"], first["mode"]) == (
        f"{prefix}.2 · OneDNNFloat32WrongCatFn", "backward", "a", "function"), first
    local = {(r.layer, r.pass_, r.quantity, r.side) for r in report.rows if r.status in FAILING and r.mode == "local"}
    assert local == {(f"{prefix}.{i}", "backward", "grad_input", "a") for i in range(3)}
    assert {r.explained_by for r in report.rows if r.status in FAILING and r.mode == "local"} == {
        f"{prefix}.{i} · OneDNNFloat32WrongCatFn" for i in range(3)}
    assert all(r.status == Status.OK for r in report.rows if r.mode == "math")  # right in float64


@pytest.mark.parametrize("style", list(STYLES))
def test_gradcheck_catches_a_cat_backward_wrong_in_every_dtype_at_its_unit(style: str) -> None:
    x, y = _batch(n=2, size=6)
    layer = "dense.1" if style == "functional" else "layers.1"
    report = gradcheck_model(_model(style, WrongCatFn), x, y, layers=[layer], loss_fn=STYLES[style][1])
    assert report.verdict == "fail"
    assert report.first_failure["layer"] == f"{layer} · WrongCatFn"  # the Function, a unit inside its layer
    assert any(r.layer == layer and not r.culprit for r in report.failures)  # the layer fails, explained by it
    right = gradcheck_model(_model(style, CatFn), x, y, layers=[layer], loss_fn=STYLES[style][1])
    assert right.verdict == "pass"


# -- finding the calls ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", list(STYLES))
def test_every_call_is_found_once_with_its_module_even_when_recomputed(style: str) -> None:
    x, y = _batch()
    calls = mathcheck.find_calls(_model(style, CatFn, ScaledReluFn), x, y, loss_fn=STYLES[style][1])
    prefix = "dense" if style == "functional" else "layers"
    assert sorted((c.name, c.module) for c in calls) == sorted(
        [("CatFn", f"{prefix}.{i}") for i in range(3)] + [("ScaledReluFn", f"{prefix}.{i}") for i in range(3)])
    cat = next(c for c in calls if c.name == "CatFn" and c.module.endswith(".2"))
    assert len(cat.args) == (2 if style == "functional" else 3) and all(a.dtype == torch.float64 for a in cat.args)


def test_finding_calls_under_a_users_profiler_keeps_the_profiler() -> None:
    """diff under cProfile crashed ('Profile' object is not callable) when restoring the profiler."""
    import cProfile

    x, y = _batch()
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        calls = mathcheck.find_calls(_model("functional", CatFn), x, y, loss_fn=STYLES["functional"][1])
        still = sys.getprofile()
    finally:
        profiler.disable()
    assert [c.name for c in calls] == ["CatFn"] * 3
    assert still is profiler


def test_functions_whose_backward_is_unused_and_torch_functions_are_skipped() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(SwishFn.apply(x))

    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    assert mathcheck.find_calls(Model(), x, y) == []  # the input needs no gradient: that backward is unused
    assert [c.name for c in mathcheck.find_calls(Model(), x.requires_grad_(), y)] == ["SwishFn"]


# -- the check itself --------------------------------------------------------------------------------------------
def _call(cls: type, *args: object) -> mathcheck.FunctionCall:
    needs = tuple(isinstance(a, Tensor) and a.is_floating_point() for a in args)
    return mathcheck.FunctionCall(cls=cls, module="m", args=args, needs=needs)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 4), c1=st.integers(1, 5), c2=st.integers(1, 5), hw=st.integers(1, 4),
       seed=st.integers(0, 2 ** 16))
def test_cat_is_verified_and_its_rolled_backward_is_math(n: int, c1: int, c2: int, hw: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, c1, hw, hw, generator=g, dtype=torch.float64)
    b = torch.randn(n, c2, hw, hw, generator=g, dtype=torch.float64)
    right = mathcheck.check_call(_call(CatFn, a, b), seed=seed)
    assert right.status == "ok" and right.error <= right.tolerance < 1e-6
    wrong = mathcheck.check_call(_call(WrongCatFn, a, b), seed=seed)
    assert wrong.status == ("ok" if n == 1 else "math")  # one sample: rolling changes nothing, it is right


def test_a_kink_at_the_inputs_is_unverifiable_never_a_false_alarm() -> None:
    x = torch.tensor([[-1.0, 0.0, 0.5, 0.0]], dtype=torch.float64)  # exact zeros: every step crosses them
    result = mathcheck.check_call(_call(ScaledReluFn, x))
    assert result.status == "unverifiable" and "kink" in result.note


class NotReproducibleFn(torch.autograd.Function):
    """Its forward adds Python-random noise (not torch's RNG): no finite difference can check it."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x + random.random()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g


class TorchRandomFn(torch.autograd.Function):
    """Dropout-like, from torch's RNG, mask saved for backward: checkable at fixed draws."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        mask = (torch.rand_like(x) > 0.5).to(x.dtype)
        ctx.save_for_backward(mask)
        return x * mask * 2

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (mask,) = ctx.saved_tensors
        return g * mask * 2


def test_a_forward_that_is_not_reproducible_gets_a_note_not_a_finding() -> None:
    x = torch.randn(3, 4, dtype=torch.float64)
    result = mathcheck.check_call(_call(NotReproducibleFn, x))
    assert result.status == "not_reproducible" and "different outputs" in result.note
    rows = mathcheck.rows([result])
    assert rows[0].status == Status.OK and rows[0].note.startswith("not checked")
    assert mathcheck.check_call(_call(TorchRandomFn, x)).status == "ok"


def test_a_non_finite_backward_is_math() -> None:
    class NanFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: Tensor) -> Tensor:
            return 3 * x

        @staticmethod
        def backward(ctx, g: Tensor) -> Tensor:
            return g * float("nan")

    result = mathcheck.check_call(_call(NanFn, torch.randn(2, 3, dtype=torch.float64)))
    assert result.status == "math" and "non-finite" in result.note
