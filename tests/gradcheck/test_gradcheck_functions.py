"""gradcheck: every call of a user's custom autograd Function is a unit of its own, named ``module · Function``.

A planted wrong cat backward (a custom Function in the user's forward, wrong in every dtype) is caught at that
Function in each style a DenseNet is written in; the module that calls it fails too and is explained by it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from densenet_debug.gradcheck.engine import gradcheck_model


class CatFn(torch.autograd.Function):
    """torch.cat along channels; ``WRONG`` scales channel 1 of the gradient handed to the first input."""

    WRONG = 1.0

    @staticmethod
    def forward(ctx, *xs: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.sizes = [t.shape[1] for t in xs]
        return torch.cat(xs, 1)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
        parts = list(torch.split(g, ctx.sizes, 1))
        if CatFn.WRONG != 1.0:
            parts[0] = parts[0].clone()
            parts[0][:, 1] *= CatFn.WRONG
        return tuple(parts)


class ModuleLayer(nn.Module):
    """Module style: BN-ReLU-conv children, the cat through the Function in forward."""

    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(c, k, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return CatFn.apply(x, self.conv(self.relu(self.norm(x))))


class FunctionalLayer(nn.Module):
    """The seed's style: F.relu in forward."""

    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, k, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return CatFn.apply(x, self.conv1(F.relu(self.bn1(x))))


class InplaceBlock(nn.Module):
    """torchvision's style: in-place ReLUs, a list of features concatenated by the block."""

    def __init__(self, c: int, k: int, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c + i * k), nn.ReLU(inplace=True), nn.Conv2d(c + i * k, k, 3, padding=1,
                                                                                      bias=False))
            for i in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(CatFn.apply(*features)))
        return CatFn.apply(*features)


class Net(nn.Module):
    def __init__(self, style: str, c: int = 4, k: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        if style == "module":
            self.block = nn.Sequential(ModuleLayer(c, k), ModuleLayer(c + k, k))
        elif style == "functional":
            self.block = nn.Sequential(FunctionalLayer(c, k), FunctionalLayer(c + k, k))
        else:
            self.block = InplaceBlock(c, k, 2)
        self.fc = nn.Linear(c + 2 * k, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.block(self.stem(x)), inplace=True)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


STYLES = ["module", "functional", "inplace"]


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 6, 6, generator=g), torch.randint(0, 10, (2,), generator=g)


@pytest.mark.parametrize("style", STYLES)
def test_a_wrong_cat_backward_is_caught_at_the_function(style: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CatFn, "WRONG", 1.001)
    torch.manual_seed(0)
    report = gradcheck_model(Net(style), *_data(0))
    assert report.verdict == "fail"
    first = report.first_failure
    assert first is not None and first["layer"].endswith(" · CatFn"), first
    functions = [r for r in report.rows if r.layer.endswith("CatFn")]
    assert functions and all(r.status == "fail" and r.culprit for r in functions)  # every call is wrong
    module = first["layer"].split(" · ")[0]
    around = [r for r in report.failures if r.layer == module]
    assert around and not any(r.culprit for r in around)  # the module fails too, explained by its Function
    assert all(r.layer.endswith("CatFn") for r in report.failures if r.culprit)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), style=st.sampled_from(STYLES))
def test_a_correct_cat_function_passes_as_a_unit(seed: int, style: str) -> None:
    torch.manual_seed(seed)
    report = gradcheck_model(Net(style), *_data(seed), seed=seed)
    assert report.verdict == "pass", [(r.layer, r.tensor, r.error, r.tolerance) for r in report.failures]
    functions = [r for r in report.rows if r.layer.endswith("CatFn")]
    assert len(functions) == (3 if style == "inplace" else 2)  # one row per call
    assert all(r.status == "pass" and 0 < r.tolerance < 0.5 for r in functions)


def test_layers_select_the_functions_inside_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CatFn, "WRONG", 2.0)
    torch.manual_seed(0)
    report = gradcheck_model(Net("module"), *_data(0), layers=["block.1"])
    assert {r.layer for r in report.rows if "CatFn" in r.layer} == {"block.1 · CatFn"}
    assert report.first_failure is not None and report.first_failure["layer"] == "block.1 · CatFn"
    assert not any("CatFn" in r.layer for r in gradcheck_model(Net("module"), *_data(0), layers=["fc"]).rows)
