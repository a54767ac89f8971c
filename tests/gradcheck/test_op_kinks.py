"""gradcheck on models written with functional and in-place ReLUs: op-level kinks, no false FAIL, faults caught.

A ReLU written as ``F.relu`` in a composite's (or the model's) own forward, or as an in-place module, is
invisible to module-level kink detection; the step of a whole-model row can cross one of its inputs near 0
(issue 12, item 3). These models are written here, in the styles users write them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densenet_debug.capture import capture
from densenet_debug.capture.kinks import signed_coordinate
from densenet_debug.gradcheck.engine import gradcheck_model, gradcheck_unit


class ConvReluMeanLinear(nn.Module):
    """conv -> F.relu -> mean -> linear: every ReLU is functional, in the model's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class _FunctionalLayer(nn.Module):
    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(c), nn.Conv2d(c, k, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.conv(F.relu(self.bn(x)))), 1)


class FunctionalDenseNet(nn.Module):
    """Three dense layers with functional ReLUs, the research-code style."""

    def __init__(self, k: int = 4, n: int = 3, classes: int = 5) -> None:
        super().__init__()
        c = 2 * k
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.layers = nn.Sequential(*[_FunctionalLayer(c + i * k, k) for i in range(n)])
        self.bn, self.fc = nn.BatchNorm2d(c + n * k), nn.Linear(c + n * k, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.stem(x))))
        return F.log_softmax(self.fc(torch.squeeze(F.avg_pool2d(out, out.shape[-1]))), dim=-1)


class _ScaleChannelGrad(torch.autograd.Function):
    """Identity forward; a backward that scales gradient channel 1 by ``SCALE`` (wrong in every dtype if != 1)."""

    SCALE = 1.0

    @staticmethod
    def forward(ctx, t):  # noqa: ANN001
        return t.clone()

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        g = g.clone()
        g[:, 1] *= _ScaleChannelGrad.SCALE
        return g


class _InplaceLayer(nn.Module):
    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.norm, self.relu = nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(c, k, 3, padding=1, bias=False)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return self.conv(self.relu(self.norm(torch.cat(features, 1))))


class InplaceDenseNet(nn.Module):
    """torchvision style: in-place ReLU modules, a list of features concatenated, a final in-place F.relu;
    ``wrong`` puts a custom Function with a wrong backward in the model's own forward, between units."""

    def __init__(self, k: int = 4, n: int = 3, classes: int = 5, wrong: bool = False) -> None:
        super().__init__()
        c = 2 * k
        self.conv0 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.layers = nn.ModuleList([_InplaceLayer(c + i * k, k) for i in range(n)])
        self.norm, self.classifier = nn.BatchNorm2d(c + n * k), nn.Linear(c + n * k, classes)
        self.wrong = wrong

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.conv0(x)]
        if self.wrong:
            features[0] = _ScaleChannelGrad.apply(features[0])
        for layer in self.layers:
            features.append(layer(*features))
        out = F.relu(self.norm(torch.cat(features, 1)), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _data(seed: int, n: int = 4, hw: int = 6, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, hw, hw, generator=g), torch.randint(0, classes, (n,), generator=g)


def _relu_near_zero(model: ConvReluMeanLinear, x: torch.Tensor, distance: float) -> None:
    """Shift the conv bias so that one pre-activation of the F.relu lies ``distance`` above 0 (float64 model)."""
    with torch.no_grad():
        z = model.conv(x.double())
        c = 2
        i = int(z[:, c].abs().argmin())
        model.conv.bias[c] -= z[:, c].reshape(-1)[i] - distance


def test_functional_relu_within_the_step_of_zero_is_a_kink_not_a_failure() -> None:
    """Seed 1, one pre-activation 1e-5 above 0: before op-level kinks the whole-model row FAILed here."""
    torch.manual_seed(1)
    model = ConvReluMeanLinear().double()
    x, y = _data(1)
    _relu_near_zero(model, x, 1e-5)
    with capture(model, values=True) as cap:
        model(x.double())
    relus = [r for r in cap.records if r.op.startswith("aten.relu")]
    assert relus and float(signed_coordinate(relus[0]).abs().min()) < 1e-5  # the near-zero input is there
    report = gradcheck_model(model, x, y, seed=1)
    assert report.verdict == "pass", [(r.layer, r.tensor, r.error, r.tolerance) for r in report.failures]
    root = [k for k in report.kinks if k.layer == ""]
    assert root and any("(model) · aten.relu" in op for k in root for op in k.ops)


# Batch 2 of 32x32 images, as the CLI draws them: every seed below FAILed before op-level kinks.
@pytest.mark.parametrize("seed", [0, 1, 3])
def test_conv_relu_mean_linear_passes(seed: int) -> None:
    torch.manual_seed(seed)
    report = gradcheck_model(ConvReluMeanLinear(), *_data(seed, n=2, hw=32), seed=seed)
    assert report.verdict == "pass", [(r.layer, r.tensor, r.error, r.tolerance) for r in report.failures]
    assert any(r.layer == "" for r in report.rows)  # the whole-model row is checked


@pytest.mark.parametrize("seed", [0, 3])
def test_functional_densenet_passes(seed: int) -> None:
    torch.manual_seed(seed)
    report = gradcheck_model(FunctionalDenseNet(k=6, n=4), *_data(seed, n=2, hw=32), seed=seed)
    assert report.verdict == "pass", [(r.layer, r.tensor, r.error, r.tolerance) for r in report.failures]


@pytest.mark.parametrize("seed", [0, 2])
def test_inplace_densenet_passes(seed: int) -> None:
    torch.manual_seed(seed)
    report = gradcheck_model(InplaceDenseNet(k=6, n=4), *_data(seed, n=2, hw=32), seed=seed)
    assert report.verdict == "pass", [(r.layer, r.tensor, r.error, r.tolerance) for r in report.failures]


@pytest.mark.parametrize("scale", [1.01, 0.0])
def test_wrong_custom_function_between_units_still_fails_at_the_model_row(scale: float,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong backward in every dtype, in the model's own forward: the custom Function is a unit of its own
    and fails; the whole-model row fails too, and its op-level kinks (in-place and functional ReLUs) must not
    excuse it."""
    monkeypatch.setattr(_ScaleChannelGrad, "SCALE", scale)
    torch.manual_seed(0)
    report = gradcheck_model(InplaceDenseNet(wrong=True), *_data(0))
    assert report.verdict == "fail"
    assert report.first_failure is not None and report.first_failure["layer"] == "_ScaleChannelGrad"
    assert any(r.layer == "" for r in report.failures)
    monkeypatch.setattr(_ScaleChannelGrad, "SCALE", 1.0)
    assert gradcheck_model(InplaceDenseNet(wrong=True), *_data(0)).verdict == "pass"


class ConvMaxPoolLinear(nn.Module):
    """A functional max-pool after a functional ReLU: both are piecewise ops the probe captures (both ends)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.conv(x)), 2), 1))


@pytest.mark.parametrize("seed", [0, 1])
def test_functional_max_pool_passes(seed: int) -> None:
    torch.manual_seed(seed)
    model = ConvMaxPoolLinear()
    with capture(model.double(), values=True) as cap:
        model(_data(seed, n=2, hw=8)[0].double())
    assert any(r.op.startswith("aten.max_pool2d") for r in cap.records)
    report = gradcheck_model(model, *_data(seed, n=2, hw=8), seed=seed)
    assert report.verdict == "pass", [(r.layer, r.tensor, r.error, r.tolerance, r.note) for r in report.failures]


class _ClampTwice(nn.Module):
    """A user module of its own math: clamp (no gradient rule for a bound here) on inputs exactly at 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, min=0.0) * 2


def test_unavoidable_op_level_kink_is_named_and_not_failed() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x[:, 0] = 0.0  # on the boundary: every step moves them across it, no step is small enough
    rows = gradcheck_unit(_ClampTwice(), [x], seed=0)
    assert rows and all(r.status != "fail" for r in rows), [(r.status, r.note) for r in rows]
    assert any("· aten.clamp" in r.note and r.kinks >= 4 for r in rows), [(r.status, r.kinks, r.note) for r in rows]


class _HardswishTwice(nn.Module):
    """hardswish in a forward: ``x relu6(x + 3) / 6``, its slope jumps at -3 and at 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardswish(x) * 2


def test_hardswish_inputs_on_its_boundaries_are_kinks_not_failures() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x[:, 0], x[:, 1] = 3.0, -3.0  # on both boundaries: every step moves them across
    rows = gradcheck_unit(_HardswishTwice(), [x], seed=0)
    assert rows and all(r.status != "fail" for r in rows), [(r.status, r.error, r.tolerance) for r in rows]
    assert any("· aten.hardswish" in r.note and r.kinks >= 8 for r in rows), [(r.status, r.kinks, r.note)
                                                                              for r in rows]


def test_hardsigmoid_float64_backward_is_judged_against_its_derivative() -> None:
    """torch 2.13's CPU ``hardsigmoid_backward`` multiplies by 1/6 *as float32* in float64 too (0.16666667163...):
    the analytic gradient is 3e-8 off its derivative, far above float64 rounding, in every backend. gradcheck
    judges the math, so it must name that unit; a torch whose slope is 1/6 to float64 must pass."""
    probe = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    F.hardsigmoid(probe).sum().backward()
    exact = float(probe.grad) == 1 / 6
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g, dtype=torch.float64)  # |x| < 3 almost surely: no kink in the way
    x = x.clamp(-2.5, 2.5)
    rows = gradcheck_unit(nn.Hardsigmoid(), [x], seed=0)
    statuses = {r.status for r in rows}
    assert statuses == {"pass"} if exact else "fail" in statuses, [(r.status, r.error, r.tolerance) for r in rows]
