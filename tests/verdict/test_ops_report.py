"""``diff --ops`` in one report: op rows are rows of the diff report, the verdict combines both engines,
``first_divergence`` names the aten op inside the first failing unit (or the first failing op when no unit's
row fails), units' rows name the failing op inside them, schema ``densenet-debug/diff/3``; the CLI exits 0 on
agree and 1 on an op-level finding. Models written the way users write them (F.relu and torch.cat in forward,
a squeezed, log-softmaxed output)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_debug.cli import main
from densenet_debug.table import make_console
from densenet_debug.verdict.engine import diff
from densenet_debug.verdict.ops import add_ops
from densenet_debug.verdict.render import leading_rows, print_report, to_html
from densenet_debug.verdict.report import (
    FAILING,
    OP,
    SCHEMA,
    DiffReport,
    FirstDivergence,
    Row,
    Status,
    first_divergence,
    unit_of,
    with_op,
)

HERE = Path(__file__)
FAULT_708 = "native+fault:strided_read_as_contiguous@dense.1.conv1"


# -- a user's model --------------------------------------------------------------------------------------------
def _onednn_fp32(t: Tensor) -> bool:
    return torch.backends.mkldnn.enabled and t.dtype == torch.float32


class NudgedConv(nn.Conv2d):
    """A user's conv that, under oneDNN in float32 only, multiplies its output by 1 + 2**-22: an op the oracle
    and the other side never run that changes values, by far less than the conv's own tolerance."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out * (1 + 2**-22) if _onednn_fp32(out) else out


class Layer(nn.Module):
    """The seed's style: F.relu inside forward and torch.cat((x, out), 1) in the same forward."""

    def __init__(self, c: int, k: int, nudge: bool = False) -> None:
        super().__init__()
        conv = NudgedConv if nudge else nn.Conv2d
        self.bn1, self.conv1 = nn.BatchNorm2d(c), conv(c, k, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((x, self.conv1(F.relu(self.bn1(x)))), 1)


class ScaleGrad(torch.autograd.Function):
    """Identity forward; a backward that scales the gradient by 1 + 1e-6 under oneDNN in float32 only."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # noqa: ANN001
        return g * (1 + 1e-6) if _onednn_fp32(g) else g


class ScaledLayer(Layer):
    """The gradient into conv1's output scaled between conv1 and the cat: code between units."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((x, ScaleGrad.apply(self.conv1(F.relu(self.bn1(x))))), 1)


class Net(nn.Module):
    def __init__(self, layer: type[Layer] = Layer, nudge: bool = False, k: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 2 * k, 3, padding=1, bias=False)
        self.dense = nn.Sequential(layer(2 * k, k, nudge), Layer(3 * k, k))
        self.bn, self.fc = nn.BatchNorm2d(4 * k), nn.Linear(4 * k, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.dense(self.stem(x))
        out = torch.squeeze(F.avg_pool2d(F.relu(self.bn(out)), out.shape[-1]))
        return F.log_softmax(self.fc(out), dim=-1)


def agreeing(num_classes: int = 5) -> nn.Module:
    """Factory for the CLI: the user's model as written."""
    torch.manual_seed(0)
    return Net(num_classes=num_classes)


def nudged(num_classes: int = 5) -> nn.Module:
    """Factory for the CLI: the model with the oneDNN-only rescale in its first layer's conv."""
    torch.manual_seed(0)
    return Net(nudge=True, num_classes=num_classes)


def _data(n: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def _with_ops(model: nn.Module, a: str, b: str, **kwargs: object) -> tuple[DiffReport, str]:
    """The unit-level report's verdict, then the same report with both sides' op rows merged in."""
    x, y = _data()
    report = diff(model, x, y, a, b, **kwargs)
    before = report.verdict
    return add_ops(report, model, x, y, a, b), before


def _failing(report: DiffReport, mode: str | None = None) -> list[Row]:
    return [r for r in report.rows if r.status in FAILING and (mode is None or (r.mode == OP) == (mode == OP))]


# -- the report ------------------------------------------------------------------------------------------------
def test_agreeing_sides_give_op_rows_in_the_one_report() -> None:
    report, before = _with_ops(agreeing(), "mkldnn", "native")
    assert before == "agree" and report.verdict == "agree", [r.layer for r in _failing(report)]
    assert report.first_divergence is None
    ops = [r for r in report.rows if r.mode == OP]
    assert ops and all(r.op and r.op.startswith("aten.") and " · " in r.layer for r in ops)
    assert all(r.error_a is not None and r.error_b is not None for r in ops if r.origin != "not replayed")
    keys = [(r.layer, r.quantity) for r in ops]
    assert len(keys) == len(set(keys))  # one row per op call and quantity, both sides' figures on it
    # F.relu twice in a layer's forward (forward and backward): calls numbered, module path first
    assert {"dense.0 · aten.relu", "dense.0 · aten.threshold_backward"} <= {r.layer for r in ops}
    conv = next(r for r in ops if r.layer == "dense.1.conv1 · aten.convolution_backward" and r.quantity == "grad_input")
    assert conv.pass_ == "backward" and conv.ratio_a <= 1 and conv.ratio_b <= 1
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["schema"] == SCHEMA == "densenet-debug/diff/3"
    op_rows = [r for r in doc["rows"] if r["mode"] == "op"]
    assert {(r["module"], r["op"]) for r in op_rows} >= {("dense.1.conv1", "aten.convolution_backward")}
    assert all("module" not in r for r in doc["rows"] if r["mode"] != "op")
    sides = doc["settings"]["ops"]
    assert [s["verdict"] for s in sides] == ["agree", "agree"] and all("worst" not in s for s in sides)
    assert "per-op check:" in report.summary and "0 failing" in report.summary


def test_a_planted_708_names_the_convolution_backward_inside_the_failing_unit() -> None:
    report, before = _with_ops(agreeing(), "mkldnn", FAULT_708)
    assert before == "mismatch" and report.verdict == "mismatch"
    first = report.first_divergence
    assert (first["layer"], first["pass"], first["mode"], first["side"]) == ("dense.1.conv1", "backward", "local", "b")
    assert first["op"] == "aten.convolution_backward"
    assert {r.layer for r in _failing(report, OP)} == {"dense.1.conv1 · aten.convolution_backward"}
    unit = next(r for r in report.rows if r.layer == "dense.1.conv1" and r.mode == "local" and r.pass_ == "backward")
    assert "failing op inside: dense.1.conv1 · aten.convolution_backward" in unit.note
    forward = [r for r in report.rows if r.mode != OP and r.pass_ == "forward"]
    assert not any("failing op inside" in r.note for r in forward)  # the op fails in the backward only
    assert "op aten.convolution_backward fails first" in report.summary
    assert json.loads(json.dumps(report.to_json()))["first_divergence"]["op"] == "aten.convolution_backward"


@pytest.mark.gpu
def test_cuda_sides_merge_op_rows_and_a_planted_708_names_the_backward_conv() -> None:
    """The same report with both sides on CUDA (the oracle stays float64 on the CPU): cuDNN against no-cuDNN
    agree op by op, and the #708 read planted under cuDNN is named at dense.1.conv1's convolution_backward."""
    report, before = _with_ops(agreeing(), "cudnn", "no-cudnn")
    assert before == "agree" and report.verdict == "agree", [r.layer for r in _failing(report)]
    assert any(r.mode == OP for r in report.rows)
    report, _ = _with_ops(agreeing(), "no-cudnn", "cudnn+fault:strided_read_as_contiguous@dense.1.conv1")
    assert report.verdict == "mismatch"
    assert (report.first_divergence["layer"], report.first_divergence["op"]) == ("dense.1.conv1",
                                                                                  "aten.convolution_backward")


def test_a_side_only_op_no_unit_sees_is_the_first_divergence() -> None:
    report, before = _with_ops(nudged(), "mkldnn", "native")
    assert before == "agree", "the unit-level check sees nothing: the rescale is far inside the conv's tolerance"
    assert report.verdict == "mismatch" and not _failing(report, "units")
    first = report.first_divergence
    assert (first["layer"], first["op"], first["mode"]) == ("dense.0.conv1", "aten.mul.Tensor", "op")
    assert first["side"] == "a"
    assert first["pass"] == "forward" and first["status"] == "mismatch"
    assert report.summary.startswith("mismatch: mkldnn wrong at op dense.0.conv1 · aten.mul.Tensor (this side only)")
    assert "unit level: agree" in report.summary
    # rolled up: the conv's and its layer's forward rows name the op that fails inside them; a sibling's does not
    name = "failing op inside: dense.0.conv1 · aten.mul.Tensor (this side only)"
    for unit in ("dense.0.conv1", "dense.0"):
        row = next(r for r in report.rows if r.layer == unit and r.mode == "local" and r.pass_ == "forward")
        assert row.status == Status.OK and name in row.note, unit
    sibling = next(r for r in report.rows if r.layer == "dense.0.bn1" and r.mode == "local" and r.pass_ == "forward")
    assert "failing op" not in sibling.note
    sides = report.settings["ops"]
    assert [s["verdict"] for s in sides] == ["mismatch", "agree"]
    assert any(u["verdict"] == "finding" and "aten.mul.Tensor" in u["unit"] for u in sides[0]["unmatched"])


def test_a_wrong_gradient_between_units_names_the_op_in_the_code_around_the_unit() -> None:
    report, _ = _with_ops(Net(layer=ScaledLayer), "mkldnn", "native", math_check=False)
    first = report.first_divergence
    assert report.verdict == "mismatch" and first["layer"] == "dense.0.conv1" and first["mode"] == "between"
    assert first["op"] == "aten.mul.Tensor"  # the scaling runs in dense.0's code, around conv1


def test_leading_table_ranks_op_rows_by_ratio_and_the_html_shows_them() -> None:
    report, _ = _with_ops(agreeing(), "mkldnn", "native")
    lead = leading_rows(report)
    teacher = [r for r in report.rows if r.mode in ("local", "function", OP)]
    best = max(teacher, key=lambda r: r.worst_ratio)
    assert best in lead  # the row closest to its tolerance leads, whatever its mode
    console = make_console(record=True, width=200)
    print_report(report, console)
    text = console.export_text()
    assert "ops mkldnn: agree" in text and "ops native: agree" in text
    page = to_html(report)
    assert "Op rows (--ops)" in page and "aten.convolution_backward" in page


class DroppedNet(Net):
    """A random op in the user's forward (noise drawn, then weighted by 0): it cannot be replayed on the oracle's
    inputs. (A dropout would not do: every dropout is off while judging, ``models.copies.dropout_off``.)"""

    def forward(self, x: Tensor) -> Tensor:
        out = self.dense(self.stem(x))
        out = out + 0.0 * torch.rand_like(out)
        out = torch.squeeze(F.avg_pool2d(F.relu(self.bn(out)), out.shape[-1]))
        return F.log_softmax(self.fc(out), dim=-1)


def test_op_calls_left_unjudged_are_counted_in_the_summary_line() -> None:
    torch.manual_seed(0)
    report, _ = _with_ops(DroppedNet(), "mkldnn", "native")
    skipped = [s["skipped"] for s in report.settings["ops"]]
    assert all(any("random" in why for why in s) for s in skipped), skipped
    assert "not judged: mkldnn " in report.summary and "native " in report.summary.split("not judged:")[1]
    n = next(n for why, n in skipped[0].items() if "random" in why)
    assert f"{n} random op" in report.summary
    plain, _ = _with_ops(agreeing(), "mkldnn", "native")  # nothing left out: nothing said
    assert "not judged" not in plain.summary


def test_with_units_only_the_ops_inside_them_are_rows_and_findings() -> None:
    """A failing op outside the units asked for is not reported; inside them it still is."""
    x, y = _data()
    outside = diff(nudged(), x, y, "mkldnn", "native", units=["dense.1"])
    add_ops(outside, nudged(), x, y, "mkldnn", "native", units=["dense.1"])
    ops = [r for r in outside.rows if r.mode == OP]
    assert ops and all(unit_of(r.layer) == "dense.1" or unit_of(r.layer).startswith("dense.1.") for r in ops)
    assert outside.verdict == "agree", [r.layer for r in _failing(outside)]  # the nudge is in dense.0
    within = diff(nudged(), x, y, "mkldnn", "native", units=["dense.0"])
    add_ops(within, nudged(), x, y, "mkldnn", "native", units=["dense.0"])
    assert within.verdict == "mismatch"
    assert any(r.mode == OP and unit_of(r.layer).startswith("dense.0") for r in _failing(within))


class _SecondCallNudge(nn.Conv2d):
    """A kernel with state: once its float32 weights have moved (the second step), its output is 2^-10 too large."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        if x.dtype != torch.float32:
            return out
        if not hasattr(self, "first_weight"):
            self.first_weight = self.weight.detach().clone()
        return out if torch.equal(self.weight, self.first_weight) else out * (1 + 2**-10)


def test_ops_of_every_step_are_judged_and_a_second_step_fault_shows_in_step_1() -> None:
    x, y = _data()
    torch.manual_seed(0)
    model = Net()
    stateful = _SecondCallNudge(model.dense[1].conv1.in_channels, model.dense[1].conv1.out_channels, 3, padding=1,
                                bias=False)
    stateful.load_state_dict(model.dense[1].conv1.state_dict())
    model.dense[1].conv1 = stateful
    report = diff(model, x, y, "mkldnn", "native", steps=2)
    add_ops(report, model, x, y, "mkldnn", "native")
    ops = [r for r in report.rows if r.mode == OP]
    assert {r.step for r in ops} == {0, 1}
    assert not [r for r in _failing(report, OP) if r.step == 0]  # the first step is right, op by op
    failing = [r for r in _failing(report, OP) if r.step == 1]
    assert failing and all(unit_of(r.layer) == "dense.1.conv1" for r in failing), [r.layer for r in failing]
    assert report.first_divergence is not None and report.first_divergence["step"] == 1


def test_without_ops_the_report_and_its_table_have_no_op_rows() -> None:
    x, y = _data()
    report = diff(agreeing(), x, y, "mkldnn", "native")
    assert not [r for r in report.rows if r.mode == OP] and "ops" not in report.settings
    console = make_console(record=True, width=200)
    print_report(report, console)
    text = console.export_text()
    assert " · aten." not in text and "ops mkldnn" not in text and "per-op" not in report.summary
    assert "Op rows" not in to_html(report)


class TinyKink(nn.Module):
    """A functional ReLU on pre-activations of about +-1e-50 in the fp64 oracle, which float32 rounds to 0."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1e-30))
        self.fc = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.cat((F.relu(x * self.scale).flatten(1), x.flatten(1)), 1))


@pytest.mark.parametrize("fail_on, verdict", [("mismatch", "agree"), ("kink", "mismatch")])
def test_an_op_kink_is_a_kink_of_the_report(fail_on: str, verdict: str) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 6, generator=g) * 1e-20, torch.tensor([0, 1, 2])
    model = TinyKink()
    report = diff(model, x, y, "mkldnn", "native", fail_on=fail_on, units=["fc"])  # fc alone: no kink at unit level
    assert report.verdict == "agree" and not report.kinks
    add_ops(report, model, x, y)
    kinks = [r for r in report.rows if r.mode == OP and r.status == Status.KINK]
    assert [r.layer for r in kinks] == ["(model) · aten.threshold_backward"] and "branch boundary" in kinks[0].note
    assert report.verdict == verdict
    first = report.first_divergence
    if verdict == "agree":
        assert first is None and "(kink)" in report.summary
    else:
        assert (first["layer"], first["op"], first["status"]) == ("(model)", "aten.threshold_backward", "kink")
        assert "took the other branch of a piecewise op at op (model) · aten.threshold_backward" in report.summary


# -- first_divergence's op, rule by rule ---------------------------------------------------------------------------
def _row(layer: str, order: int, status: Status = Status.MISMATCH, mode: str = OP, pass_: str = "backward") -> Row:
    return Row(layer=layer, pass_=pass_, quantity="grad_input", error_a=1.0, error_b=None, tolerance=0.1,
               status=status, origin="test", mode=mode, side="a", ratio_a=10.0, order=order,
               op=layer.split(" · ")[1].split(" ")[0] if mode == OP else None)


def test_first_divergence_names_the_first_failing_op_at_or_below_its_unit() -> None:
    unit = _row("b.l2", 5, mode="local")
    rows = [unit, _row("a.l1 · aten.mm", 1), _row("b.l2.conv · aten.convolution_backward", 9),
            _row("b.l2 · aten.cat #2", 7), _row("b.l20 · aten.add.Tensor", 3), _row("b.l2 · aten.relu", 2, Status.OK)]
    first = first_divergence(rows)
    assert first.layer == "b.l2" and first.mode == "local" and first.op == "aten.cat"  # 7 < 9; b.l20 is no child
    assert first_divergence([unit, _row("a.l1 · aten.mm", 1)]).op is None  # none inside: no op named
    only_ops = first_divergence(rows[1:])
    assert (only_ops.layer, only_ops.op, only_ops.mode) == ("a.l1", "aten.mm", OP)
    assert first_divergence([_row("x · aten.relu", 1, Status.KINK)]) is None
    assert first_divergence([_row("x · aten.relu", 1, Status.KINK)], kinks_fail=True).op == "aten.relu"
    root = FirstDivergence(layer="(model) · CatFn", pass_="backward", quantity="grad_input", error=1.0,
                           tolerance=0.1, side="a", step=0, mode="function", status="mismatch")
    outside = _row("<outside> · aten.nll_loss_backward", 0)  # the loss: outside the model
    assert with_op(root, [outside, *rows]).op == "aten.mm"  # the model's own forward holds every op of the model
    assert with_op({"layer": "b.l2", "mode": "propagated"}, rows)["op"] == "aten.cat"  # a hand-built first


# -- the CLI ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory, code, op", [("agreeing", 0, None), ("nudged", 1, "aten.mul.Tensor")])
def test_diff_ops_exit_code_is_the_combined_verdict(tmp_path: Path, capsys: pytest.CaptureFixture, factory: str,
                                                     code: int, op: str | None) -> None:
    argv = ["diff", "--model", f"{HERE}:{factory}", "--batch", "3", "--input-shape", "3,8,8", "--num-classes", "5"]
    out = tmp_path / "diff.json"
    assert main([*argv, "--json", str(out)]) == 0  # the unit-level check alone agrees on both
    assert json.loads(out.read_text())["schema"] == "densenet-debug/diff/3"
    capsys.readouterr()
    assert main([*argv, "--ops", "--json", str(out), "--html", str(tmp_path / "diff.html")]) == code
    text = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["schema"] == "densenet-debug/diff/3" and doc["verdict"] == ("agree" if code == 0 else "mismatch")
    assert any(r["mode"] == "op" for r in doc["rows"]) and "Op rows (--ops)" in (tmp_path / "diff.html").read_text()
    if op is None:
        assert doc["first_divergence"] is None and "agree:" in text
    else:
        assert doc["first_divergence"]["op"] == op and doc["first_divergence"]["layer"] == "dense.0.conv1"
        assert f"dense.0.conv1 · {op}" in text and "mismatch: mkldnn wrong at op" in text


def test_diff_ops_with_a_ddp_side_is_refused_in_one_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["diff", "--a", "ddp:2", "--b", "mkldnn", "--ops", "--model", "densenet-bc-10"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--ops not supported when a side is ddp" in err and len(err.splitlines()) == 1
