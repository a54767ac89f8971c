"""The between check's shortcut: a check whose float64 tensor is this run's unchanged copy of the very record
it is compared with passes without reading either; everything else is still compared.

The shortcut must never pass a value that differs: a unit output changed in place before the next unit reads it
(a float32-only ``mul_`` written in a ``forward``, a gradient scaled in place by a hook) is not the record it was
copied from any more, and must still be found.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from densenet_debug.verdict import between
from densenet_debug.verdict.engine import diff
from densenet_debug.verdict.report import Status


class Chain(nn.Module):
    """conv -> bn -> relu -> conv -> pool -> flatten -> linear, each a module handed the previous one's output as
    it is, plus an optional float32-only change written in the forward between conv1 and bn."""

    def __init__(self, forward_fault: float = 0.0, grad_fault: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8, 10)
        self.forward_fault, self.grad_fault = forward_fault, grad_fault

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(x)
        if self.forward_fault and h.dtype == torch.float32:
            h.mul_(1 + self.forward_fault)  # in place: the tensor conv1 returned, changed before bn reads it
        if self.grad_fault and h.requires_grad:
            scale = 1 + self.grad_fault
            h.register_hook(lambda g: g.mul_(scale) if g.dtype == torch.float32 else None)  # in place, fp32 only
        h = self.conv2(self.relu(self.bn(h)))
        return self.fc(self.flatten(self.pool(h)))


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)


def _model(**kw: float) -> Chain:
    torch.manual_seed(0)
    return Chain(**kw)


def _between(report: object) -> list:
    return [r for r in report.rows if r.mode == "between"]


def test_checks_of_records_handed_on_as_they_are_are_not_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = between.compare
    monkeypatch.setattr(between, "compare", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y = _batch()
    report = diff(_model(), x, y, "mkldnn", "native")
    assert report.verdict == "agree", report.summary
    rows = _between(report)
    assert rows and all(r.status == Status.OK for r in rows)
    assert all(r.error_a == 0 and r.error_b == 0 for r in rows if r.tolerance == 0)
    assert {(r.layer, r.quantity) for r in rows} == {(n, q) for n in ("conv1", "bn", "relu", "conv2", "pool",
                                                                      "flatten", "fc")
                                                     for q in ("input", "grad_output")}
    # every unit's input and grad_output is checked, yet only two per side needed a comparison: the model's
    # input (conv1's) and the loss gradient (fc's grad_output); every other input is the previous unit's output,
    # every other grad_output the next unit's grad_input, each handed on as it is
    assert len(calls) == 2 * 2, len(calls)


@pytest.mark.parametrize("size", [2.0**-12, 1e-3])
def test_a_unit_output_changed_in_place_before_the_next_unit_is_still_found(size: float) -> None:
    x, y = _batch()
    report = diff(_model(forward_fault=size), x, y, "mkldnn", "native")
    assert report.verdict == "mismatch", report.summary
    row = next(r for r in _between(report) if r.layer == "bn" and r.quantity == "input")
    assert row.status == Status.MISMATCH and row.side == "both", row


@pytest.mark.parametrize("size", [2.0**-12, 1e-3])
def test_a_gradient_changed_in_place_between_units_is_still_found(size: float) -> None:
    x, y = _batch()
    report = diff(_model(grad_fault=size), x, y, "mkldnn", "native")
    assert report.verdict == "mismatch", report.summary
    bad = [r for r in _between(report) if r.status == Status.MISMATCH]
    assert bad and {(r.layer, r.quantity) for r in bad} == {("conv1", "grad_output")}, bad


# -- magnitudes without a magnitude run ----------------------------------------------------------------------
class Residual(nn.Module):
    """Between code whose Jacobian has a negative entry (a difference of two units' outputs): no shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x) - self.b(x)
        return self.fc(h.mean((2, 3)))


def _models() -> dict[str, tuple[type, dict]]:
    from densenet_debug.models import build_model
    from tests.verdict.test_between import STYLES

    out = {f"between-{k}": v for k, v in STYLES.items()}
    out["densenet-bc-10"] = (lambda: build_model("densenet-bc-10"), {})
    out["residual"] = (Residual, {})
    return out


def _between_figures(report: object) -> list[tuple]:
    return [(r.layer, r.pass_, r.quantity, r.status, r.error_a, r.error_b, r.tolerance_a, r.tolerance_b)
            for r in _between(report)]


@pytest.mark.parametrize("name", sorted(_models()))
def test_magnitudes_by_a_second_backward_equal_the_magnitude_run(monkeypatch: pytest.MonkeyPatch,
                                                                  name: str) -> None:
    """Where the shortcut applies, every between row (error, tolerance, status) is what the magnitude run gives;
    it applies to a DenseNet's concatenations, not to a difference written in a forward, nor where a forward
    check rounds (a pooling written in a forward: its magnitudes need the forward on |values|)."""
    from tests.verdict.test_between import _batch as between_batch

    cls, kw = _models()[name]
    x, y = between_batch(3, 1)
    runs: list[bool] = []
    real_run = between._run
    monkeypatch.setattr(between, "_run", lambda *a, **k: runs.append(bool(k.get("magnitude"))) or real_run(*a, **k))
    torch.manual_seed(1)
    quick = _between_figures(diff(cls(**kw), x, y, "mkldnn", "native"))
    quick_runs = list(runs)
    runs.clear()
    monkeypatch.setattr(between, "_sign_free", lambda *a: False)  # every op signed: the magnitude run, always
    torch.manual_seed(1)
    full = _between_figures(diff(cls(**kw), x, y, "mkldnn", "native"))
    # the same sums of the same magnitudes; compared to a relative 1e-12, not bit for bit: the two runs need not
    # add them in one order on every build (here they do, to the bit)
    assert [q[:4] for q in quick] == [f[:4] for f in full]
    assert [q[4:] for q in quick] == [pytest.approx(f[4:], rel=1e-12, abs=0) for f in full]
    if name == "densenet-bc-10":  # concatenations and the fan-out sums of their gradients only
        assert True in runs and True not in quick_runs, (runs, quick_runs)
        assert any(t > 0 for *_, t in full), full  # checks that round were judged on those magnitudes
    if name == "residual":
        assert quick_runs == runs


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "neg", "cat", "relu", "mean"])
def test_only_ops_without_a_negative_jacobian_entry_are_sign_free(op: str) -> None:
    a = torch.randn(3, 4)
    calls = {"add": (torch.ops.aten.add.Tensor, (a, a), {}), "sub": (torch.ops.aten.sub.Tensor, (a, a), {}),
             "mul": (torch.ops.aten.mul.Tensor, (a, a), {}), "div": (torch.ops.aten.div.Tensor, (a, a), {}),
             "neg": (torch.ops.aten.neg.default, (a,), {}), "cat": (torch.ops.aten.cat.default, ([a, a],), {}),
             "relu": (torch.ops.aten.relu.default, (a,), {}), "mean": (torch.ops.aten.mean.dim, (a, [0]), {})}
    func, args, kwargs = calls[op]
    assert between._sign_free(func, args, kwargs) == (op in ("add", "cat", "relu", "mean"))
    assert not between._sign_free(torch.ops.aten.add.Tensor, (a, a), {"alpha": -1})  # a subtraction
    assert between._sign_free(torch.ops.aten.div.Scalar, (a, 4), {})  # a mean's backward
    assert not between._sign_free(torch.ops.aten.mul.Scalar, (a, -2.0), {})


# -- copies made when read ----------------------------------------------------------------------------------
def _copy_now(self: between._Tracker, t: Tensor, source: Tensor) -> None:
    with torch.no_grad():
        t.copy_(source)


@pytest.mark.parametrize("name", sorted(_models()))
@pytest.mark.parametrize("fault", [None, "forward", "grad"])
def test_copies_made_when_first_read_give_the_rows_of_copies_made_at_once(monkeypatch: pytest.MonkeyPatch,
                                                                          name: str, fault: str | None) -> None:
    """Every between row (and the verdict) is the same whether the float64 copies of the side's records are made
    when an op or a check first reads them or all up front; a fault planted in the between code is found alike."""
    from tests.verdict.test_between import ScaleChannelGrad, ShiftChannel
    from tests.verdict.test_between import _batch as between_batch

    cls, kw = _models()[name]
    x, y = between_batch(3, 2)
    saved = (ScaleChannelGrad.scale, ShiftChannel.shift)
    ScaleChannelGrad.scale, ShiftChannel.shift = (1.01, 0.0) if fault == "grad" else \
        (1.0, 1e-3) if fault == "forward" else (1.0, 0.0)
    try:
        torch.manual_seed(2)
        late = diff(cls(**kw), x, y, "mkldnn", "native")
        monkeypatch.setattr(between._Tracker, "defer", _copy_now)
        torch.manual_seed(2)
        now = diff(cls(**kw), x, y, "mkldnn", "native")
    finally:
        ScaleChannelGrad.scale, ShiftChannel.shift = saved
    assert _between_figures(late) == _between_figures(now)
    assert late.verdict == now.verdict and late.summary == now.summary


def test_copies_made_when_read_keep_a_channels_last_side_s_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A channels_last side's records are copied in their own layout, late or at once: the same rows."""
    from densenet_debug.models import build_model

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (3,), generator=g)
    torch.manual_seed(3)
    late = diff(build_model("densenet-bc-10"), x, y, "mkldnn", "native")
    monkeypatch.setattr(between._Tracker, "defer", _copy_now)
    torch.manual_seed(3)
    now = diff(build_model("densenet-bc-10"), x, y, "mkldnn", "native")
    assert late.verdict == now.verdict == "agree", late.summary
    assert _between_figures(late) == _between_figures(now)
