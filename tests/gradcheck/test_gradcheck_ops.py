"""gradcheck: every op a composite runs in its own forward is a unit of its own (``module · aten.op``).

Models in the seed's functional style and torchvision's in-place style pass with an op row per functional op;
an op with a wrong registered derivative (a ``torch.library.custom_op`` whose backward scales one channel) is
named at that op, and the composite that calls it is explained by it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from densenet_debug.gradcheck.engine import gradcheck_model

WRONG = {"scale": 1.0}


@torch.library.custom_op("densenet_debug_tests::join", mutates_args=())
def join(a: Tensor, b: Tensor) -> Tensor:
    """A user's own concatenation op (torch.library), with its derivative registered by hand."""
    return torch.cat([a, b], 1)


@join.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty((a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:]))


def _join_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.split = inputs[0].shape[1]


def _join_backward(ctx, g: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001
    ga, gb = g[:, :ctx.split].clone(), g[:, ctx.split:].clone()
    ga[:, 0] *= WRONG["scale"]
    return ga, gb


join.register_autograd(_join_backward, setup_context=_join_setup)


class SeedLayer(nn.Module):
    """The seed's bottleneck: F.relu in forward and the concatenation of its input with its output."""

    def __init__(self, c: int, k: int, own_op: bool = False) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, 2 * k, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * k)
        self.conv2 = nn.Conv2d(2 * k, k, 3, padding=1, bias=False)
        self.own_op = own_op

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return join(x, out) if self.own_op else torch.cat((x, out), 1)


class SeedNet(nn.Module):
    def __init__(self, own_op: bool = False, c: int = 4, k: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.dense1 = nn.Sequential(SeedLayer(c, k), SeedLayer(c + k, k, own_op))
        self.bn = nn.BatchNorm2d(c + 2 * k)
        self.fc = nn.Linear(c + 2 * k, 5)

    def forward(self, x: Tensor) -> Tensor:
        out = F.avg_pool2d(F.relu(self.bn(self.dense1(self.conv1(x))), inplace=True), 4)
        return F.log_softmax(self.fc(torch.squeeze(out)), dim=1)


def _nll(out: Tensor, y: Tensor) -> Tensor:
    return F.nll_loss(out, y)


def _data(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 4, 4, generator=g), torch.randint(0, 5, (2,), generator=g)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_functional_ops_are_units_and_pass(seed: int) -> None:
    torch.manual_seed(seed)
    report = gradcheck_model(SeedNet(), *_data(seed), seed=seed, loss_fn=_nll)
    assert report.verdict == "pass", [(r.layer, r.tensor, r.error, r.tolerance) for r in report.failures]
    ops = {r.layer for r in report.rows if "aten." in r.layer}
    for layer in ("dense1.0", "dense1.1"):
        assert {f"{layer} · aten.relu.default", f"{layer} · aten.relu.default#2", f"{layer} · aten.cat.default"} <= ops
    # the model's own ops: the in-place ReLU (checked on a copy), the pool, squeeze and log_softmax
    assert {"aten.relu_.default", "aten.avg_pool2d.default", "aten._log_softmax.default"} <= ops
    assert not any(r.layer.startswith("dense1.0.") and "aten." in r.layer for r in report.rows)  # leaf units' ops


@pytest.mark.parametrize("scale", [1.001, 0.0])
def test_an_op_with_a_wrong_derivative_is_named_at_that_op(scale: float, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model, data = SeedNet(own_op=True), _data(0)
    assert gradcheck_model(model, *data, loss_fn=_nll).verdict == "pass"
    monkeypatch.setitem(WRONG, "scale", scale)
    report = gradcheck_model(model, *data, loss_fn=_nll)
    assert report.first_failure is not None
    assert report.first_failure["layer"] == "dense1.1 · densenet_debug_tests.join.default"
    assert [r.layer for r in report.failures if r.culprit] == ["dense1.1 · densenet_debug_tests.join.default"]
    around = [r for r in report.failures if r.layer == "dense1.1"]
    assert around and not any(r.culprit for r in around)  # its layer fails too, explained by the op


def test_selected_layers_check_only_their_own_ops() -> None:
    torch.manual_seed(0)
    report = gradcheck_model(SeedNet(), *_data(0), layers=["dense1.1"], loss_fn=_nll)
    ops = {r.layer for r in report.rows if "aten." in r.layer}
    assert ops and all(layer.startswith("dense1.1 · ") for layer in ops)
