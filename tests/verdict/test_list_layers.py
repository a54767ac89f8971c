"""torchvision's DenseNet as torchvision writes it today: ``_DenseBlock`` hands each ``_DenseLayer`` the *list*
of feature maps so far (``layer(features)``), the layer concatenates it (optionally under a checkpoint) and
ends in ``F.dropout(new, p=drop_rate, training=self.training)``. A unit's record and replay take its tensors as
positional arguments, so such a layer crashed every verb (``cat(): argument 'tensors' ... not NoneType``, a
traceback). A module called with tensors inside a container (or as keywords) is now no unit: its own ops are
code between its children, which stay units; naming it in ``--units`` is refused in one line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from densenet_debug.errors import UsageError
from densenet_debug.gradcheck.engine import gradcheck_model
from densenet_debug.trace import discover_units
from densenet_debug.verdict.engine import diff


class _Layer(nn.Module):
    def __init__(self, c: int, k: int, drop: float, efficient: bool, wrong: bool = False) -> None:
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c, 4 * k, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(4 * k), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4 * k, k, 3, padding=1, bias=False)
        self.drop, self.efficient, self.wrong = drop, efficient, wrong

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        x = torch.cat(inputs, 1)
        if self.wrong and x.dtype == torch.float32:  # a bug in the layer's own code, float32 only
            x = x * (1 + 2**-10)
        return self.conv1(self.relu1(self.norm1(x)))

    def forward(self, input: Tensor | list[Tensor]) -> Tensor:  # noqa: A002 - torchvision's name
        prev = [input] if isinstance(input, Tensor) else input
        if self.efficient and any(t.requires_grad for t in prev):
            out = cp.checkpoint(lambda *xs: self.bn_function(list(xs)), *prev, use_reentrant=False)
        else:
            out = self.bn_function(prev)
        new = self.conv2(self.relu2(self.norm2(out)))
        return F.dropout(new, p=self.drop, training=self.training) if self.drop > 0 else new


class _DenseNet(nn.Module):
    def __init__(self, drop: float = 0.2, efficient: bool = False, wrong: int | None = None) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.layers = nn.ModuleList([_Layer(8 + 4 * i, 4, drop, efficient, wrong == i) for i in range(3)])
        self.norm5, self.fc = nn.BatchNorm2d(20), nn.Linear(20, 10)

    def forward(self, x: Tensor) -> Tensor:
        features = [self.conv0(x)]
        for layer in self.layers:
            features.append(layer(features))
        out = F.relu(self.norm5(torch.cat(features, 1)), inplace=True)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))


def _data(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 12, 12, generator=g), torch.randint(0, 10, (3,), generator=g)


def test_list_taking_layers_are_not_units_their_children_are() -> None:
    torch.manual_seed(0)
    names = discover_units(_DenseNet(), _data(0)[0])
    assert "layers.0" not in names and {"layers.0.norm1", "layers.0.conv2"} <= set(names)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), efficient=st.booleans(), drop=st.sampled_from([0.0, 0.2]))
def test_torchvision_as_written_today_agrees_and_gradchecks(seed: int, efficient: bool, drop: float) -> None:
    torch.manual_seed(seed)
    model = _DenseNet(drop, efficient)
    x, y = _data(seed)
    report = diff(model, x, y, "mkldnn", "native")
    assert report.verdict == "agree", report.summary
    assert gradcheck_model(model, x, y, seed=seed).verdict == "pass"


def test_a_float32_bug_in_a_list_layers_own_code_is_found_between_its_children() -> None:
    torch.manual_seed(0)
    report = diff(_DenseNet(wrong=1), *_data(0), "mkldnn", "native")
    assert report.verdict == "mismatch"
    first = report.first_divergence
    assert first is not None and first["mode"] == "between" and first["layer"] == "layers.1.norm1", report.summary


def test_naming_a_list_taking_layer_as_a_unit_is_one_line() -> None:
    torch.manual_seed(0)
    with pytest.raises(UsageError, match="layers.0.*list, tuple or dict"):
        diff(_DenseNet(), *_data(0), "mkldnn", "native", units=["layers.0"])
