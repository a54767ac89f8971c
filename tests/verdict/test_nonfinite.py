"""Non-finite numbers never pass: diff, gradcheck, check-reference, selftest, the pytest plugin's check.

Two user models, written as users write them (functional ops in ``forward``):

* ``log_net``: ``fc(log(conv(x)).mean((2, 3)))``: a conv output is negative somewhere, so the float64 truth
  itself is NaN: every verb refuses in one line naming where (exit 2). Before the fix gradcheck passed it
  ("error nan, tolerance nan, pass").
* ``exp_net``: ``fc(exp(200 * conv(x)).mean((2, 3)))``: finite in float64 (e^200 ~ 7e86), +inf in float32
  (> 3.4e38): a float32 side is non-finite where the oracle is finite, a finding (status ``nonfinite``, exit 1)
  that names the unit that produced it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from densenet_debug.cli import main
from densenet_debug.errors import UsageError
from densenet_debug.verdict.nonfinite import NonFiniteOracle, first_nonfinite
from densenet_debug.verdict.report import Row, Status

pytest_plugins = ["pytester"]

MODELS = """
import torch
from torch import nn


class LogNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.log(self.conv(x)).mean((2, 3)))


class ExpNet(LogNet):
    def forward(self, x):
        return self.fc(torch.exp(200 * self.conv(x)).mean((2, 3)))


def log_net(num_classes=10):
    torch.manual_seed(0)
    return LogNet(num_classes)


def exp_net(num_classes=10):
    torch.manual_seed(0)
    return ExpNet(num_classes)
"""


@pytest.fixture
def models(tmp_path: Path) -> Path:
    path = tmp_path / "nonfinite_models.py"
    path.write_text(MODELS)
    return path


def _load(models: Path, factory: str) -> nn.Module:
    from densenet_debug.models import resolve_model

    return resolve_model(f"{models}:{factory}")


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 10, (2,), generator=g)


def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- a non-finite float64 truth: exit 2, one line, naming where ------------------------------------------------
@pytest.mark.parametrize("verb", ["diff", "gradcheck"])
def test_non_finite_truth_is_a_one_line_error_naming_the_unit(verb: str, models: Path, capsys) -> None:
    argv = [verb, "--model", f"{models}:log_net", "--input-shape", "3,8,8", "--batch", "2"]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert "non-finite" in err and "<model> (forward output, step 0)" in err, err


def test_record_refuses_a_non_finite_truth(models: Path, tmp_path: Path) -> None:
    from densenet_debug.reference.record import record_reference

    x, y = _batch()
    with pytest.raises(NonFiniteOracle, match=r"non-finite .* first at <model> \(forward output"):
        record_reference(_load(models, "log_net"), x, y, tmp_path / "fx", check_oracle=False)
    assert not (tmp_path / "fx").exists()
    assert issubclass(NonFiniteOracle, UsageError)  # the CLI's exit 2


def test_gradcheck_row_with_nan_is_never_a_pass() -> None:
    """A unit whose backward returns NaN: the row's error is NaN, its status ``nonfinite``, the verdict fail."""
    from densenet_debug.gradcheck.engine import gradcheck_unit

    class NanBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    class Unit(nn.Module):
        def forward(self, x):
            return NanBackward.apply(x)

    x = torch.randn(2, 3, dtype=torch.float64)
    rows = gradcheck_unit(Unit(), [x])
    assert rows and all(r.status == "nonfinite" for r in rows), [(r.error, r.tolerance, r.status) for r in rows]


def test_fixture_with_one_nan_never_agrees() -> None:
    """One NaN in a stored truth (full or checkpoints policy) is refused at load, naming where (exit 2)."""
    from densenet_debug.reference.check import check_reference, load_reference

    root = Path(__file__).resolve().parents[2] / "reference_grads"
    for name, unit, quantity in (("densenet-bc-10-full", "block2.layer01.conv2", "param_grads"),
                                 ("densenet-bc-10-eval", "trans1.pool", "outputs")):
        fixture, model = load_reference(root / name)
        rec = fixture.traces[0][unit]
        if quantity == "param_grads":
            t = rec.param_grads["weight"].clone()
            t.view(-1)[3] = float("nan")
            rec.param_grads["weight"] = t
        else:
            t = rec.outputs[0].clone()
            t.view(-1)[3] = float("nan")
            rec.outputs[0] = t
        with pytest.raises(NonFiniteOracle, match=f"stored truth of .*{name}.* non-finite .*{unit}"):
            check_reference(fixture, "fp64", model=model)


# -- a side non-finite where the oracle is finite: status nonfinite, exit 1, the producer named -----------------
def test_diff_side_overflow_is_a_nonfinite_finding(models: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "d.json"
    argv = ["diff", "--model", f"{models}:exp_net", "--input-shape", "3,8,8", "--batch", "2", "--a", "native",
            "--b", "fp64", "--json", str(out)]
    assert main(argv) == 1
    data = json.loads(out.read_text())
    assert data["verdict"] == "mismatch" and data["schema"] == "densenet-debug/diff/3"
    first = data["first_divergence"]
    assert (first["status"], first["layer"], first["pass"], first["side"]) == ("nonfinite", "", "forward", "a")
    statuses = {r["status"] for r in data["rows"]}
    assert "nonfinite" in statuses and statuses <= {s.value for s in Status}
    assert "non-finite (NaN/Inf) where the fp64 oracle is finite" in data["summary"]
    assert "native at <model> (forward output, step 0)" in data["summary"]
    assert all(r["status"] != "ok" for r in data["rows"] if r["side"] == "a" and r["layer"] == "head")


def test_check_reference_side_overflow_is_a_nonfinite_finding(models: Path, tmp_path: Path) -> None:
    from densenet_debug.reference.check import check_reference
    from densenet_debug.reference.record import record_reference

    model = _load(models, "exp_net")
    x, y = _batch()
    path = record_reference(model, x, y, tmp_path / "exp", policy="full", check_oracle=False)
    assert check_reference(path, "fp64", model=model).verdict == "agree"
    result = check_reference(path, "native", model=model)
    assert result.verdict == "mismatch"
    assert result.first_divergence["status"] == "nonfinite"
    assert result.nonfinite and result.nonfinite[0]["layer"] == ""
    assert "non-finite (NaN/Inf) where reference" in result.summary
    assert any(r.status == Status.NONFINITE for r in result.failures)


def test_first_nonfinite_names_the_producer_not_its_consumers(models: Path) -> None:
    from densenet_debug.trace import discover_units, trace_step

    x, y = _batch()
    model = _load(models, "exp_net")
    units = discover_units(model, x)
    assert "" in units and "fc" in units  # the root does math of its own (exp, mean): it is a unit
    trace = trace_step(model, x, y, units=units)  # float32: exp overflows in the model's own forward
    assert first_nonfinite(trace) == {"layer": "", "pass": "forward", "quantity": "output", "step": 0}
    leaves = trace_step(model, x, y, units=["conv", "fc"])  # without the root, the first unit showing it
    assert first_nonfinite(leaves)["layer"] == "fc"
    trace64 = trace_step(_load(models, "exp_net").double(), x.double(), y, units=units)
    assert first_nonfinite(trace64) is None


# -- statuses, selftest ----------------------------------------------------------------------------------------
def test_status_is_a_str_enum_and_json_keeps_plain_strings() -> None:
    row = Row(layer="a", pass_="forward", quantity="output", error_a=math.nan, error_b=None, tolerance=1e-7,
              status=Status.NONFINITE, origin="")
    data = row.to_json()
    assert data["status"] == "nonfinite" and type(data["status"]) is str
    assert json.loads(json.dumps(data))["error_a"] == "nan"
    assert Status.OK == "ok" and f"{Status.MISMATCH:>9}" == " mismatch"


def test_selftest_counts_a_nonfinite_gradcheck_as_caught() -> None:
    from densenet_debug.faults.selftest import FaultResult

    def result(control: bool, detected: bool, gradcheck: str | None) -> FaultResult:
        return FaultResult("f", control, "u", "backward", {}, detected, True, math.nan, 1e-7,
                           "mismatch" if detected else "agree", None, gradcheck)

    assert result(False, True, "nonfinite").ok
    assert not result(False, True, "pass").ok
    assert not result(True, True, None).ok  # a control with a NaN finding is flagged, not "within tolerance"
    assert result(False, True, "nonfinite").to_json()["error"] == "nan"


PLUGIN_TEST = MODELS + '''

def test_exp_net_gradients(grad_reference):
    model = exp_net()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    grad_reference.check(model, x, name="exp-net", backend=["fp64", "native"])
'''


def test_pytest_plugin_fails_a_side_that_overflows(pytester: pytest.Pytester) -> None:
    """Recorded (finite float64 truth), then checked: fp64 agrees, native's +inf is a failure naming the unit."""
    import torch._dynamo  # noqa: F401  (imported once, outside the inner runs: see tests/reference/test_pytest_plugin.py)

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pytester.makepyfile(test_user=PLUGIN_TEST)
        args = ("-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest")
        recorded = pytester.runpytest(*args, "--update-reference")
        recorded.assert_outcomes(failed=1)  # recording succeeds, then native's check fails in the same run
        checked = pytester.runpytest(*args)
        checked.assert_outcomes(failed=1)
        out = checked.stdout.str()
        assert "mismatch: native non-finite (NaN/Inf) where reference exp-net is finite" in out, out
        assert (pytester.path / "reference_grads" / "exp-net" / "meta.json").is_file()
    finally:
        torch.set_num_threads(saved)
