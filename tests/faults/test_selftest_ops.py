"""The self-test through the op engine: controls planted as kernels below the capture, every fault found at its op."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from densenet_debug.backends import parse_backend, running_unit
from densenet_debug.cli import main
from densenet_debug.faults import registry
from densenet_debug.faults.registry import BUGS, CONTROLS, FAULTS, OP_SIGHTS, make_fault, op_sight
from densenet_debug.faults.selftest import harness_batch, harness_model, run_fault_ops
from densenet_debug.models import DenseNet
from densenet_debug.verdict.engine import diff
from densenet_debug.verdict.ops.judge import judge_ops, match, oracle_capture, side_capture
from densenet_debug.verdict.ops.replay import rebuild_call

MODEL = "densenet-bc-10"


def _planted(name: str, seed: int = 0, batch: int = 2) -> tuple:
    fault = make_fault(name, seed=seed)
    net = harness_model(MODEL, fault, seed)
    unit = fault.choose(net)[0]
    x, y = harness_batch(max(batch, int(fault.needs.get("min_batch", 1))), seed)
    return net, unit, x, y


def _conv_records(cap: object, unit: str) -> list:
    return [r for r in cap.records if r.module == unit and r.op.startswith("aten.convolution")]


@pytest.mark.parametrize("name", CONTROLS)
def test_control_is_one_aten_op_below_the_capture(name):
    """The capture sees exactly the stock op stream (no side-only op), with the control's values in it."""
    net, unit, x, y = _planted(name)
    be = parse_backend(f"native+fault:{name}@{unit}")
    side = side_capture(net, x, y, be)
    clean = side_capture(net, x, y, parse_backend("native"))
    assert [r.op for r in side.records] == [r.op for r in clean.records]
    _, only_oracle, only_side, _ = match(oracle_capture(net, x, y), side)
    assert not only_side and not [r for r in only_oracle if r.module == unit]
    planted, stock = _conv_records(side, unit), _conv_records(clean, unit)
    assert [r.op for r in planted] == ["aten.convolution.default", "aten.convolution_backward.default"]
    differs = [not torch.equal(a, b) for p, s in zip(planted, stock)
               for a, b in zip(p.output_values, s.output_values) if a is not None and b is not None]
    assert any(differs)  # not a no-op: the kernel computed the planted unit's ops
    upstream = [r for r in side.records if r.index < planted[0].index and r.op == "aten.convolution.default"]
    assert upstream
    for r in upstream:  # every other unit's convolution is the stock kernel
        twin = next(c for c in clean.records if c.key == r.key)
        assert all(torch.equal(a, b) for a, b in zip(r.output_values, twin.output_values) if a is not None)


@pytest.mark.parametrize("name", CONTROLS)
def test_a_replay_of_the_planted_op_computes_the_control(name):
    """One code path: under the side's active() and as its unit, a replay of the side's own op on its own
    inputs reproduces the side's values bit for bit; replayed as no unit, it is the stock kernel."""
    net, unit, x, y = _planted(name)
    be = parse_backend(f"native+fault:{name}@{unit}")
    side = side_capture(net, x, y, be)
    for r in _conv_records(side, unit):
        inputs = [v.clone() for v in r.input_values]
        with be.active(), torch.no_grad():
            with running_unit(unit):
                again = rebuild_call(r, inputs).run()
            stock = rebuild_call(r, inputs).run()
        again, stock = (list(v) if isinstance(v, tuple) else [v] for v in (again, stock))
        pairs = [(a, s, o) for a, s, o in zip(again, stock, r.output_values) if o is not None]
        assert all(torch.equal(a, o) for a, _, o in pairs)
        if name == "tf32_round":
            assert not all(torch.equal(s, o) for _, s, o in pairs)


@settings(max_examples=4, deadline=None)
@given(name=st.sampled_from(CONTROLS), seed=st.integers(0, 10**6), batch=st.integers(1, 4))
def test_controls_are_agreed_by_the_op_engine_and_the_module_engine(name, seed, batch):
    net, unit, x, y = _planted(name, seed, batch)
    spec = f"native+fault:{name}@{unit}"
    ops = judge_ops(net, x, y, spec)
    assert ops.verdict == "agree", [(r.layer, r.quantity, r.ratio_a) for r in ops.failures]
    assert diff(net, x, y, spec, "native").verdict == "agree"


def test_tf32_control_is_agreed_only_at_tf32_precision_by_the_op_engine():
    """The op judge bounds the planted conv with TF32's unit roundoff (Fault.unit_roundoff_override), derived,
    not tuned: told nothing, it flags exactly the planted unit's convolutions."""
    net, unit, x, y = _planted("tf32_round")
    be = parse_backend(f"native+fault:tf32_round@{unit}")
    be.faults[0].unit_roundoff_override = None
    report = judge_ops(net, x, y, be)
    failing = {r.layer for r in report.failures}
    assert failing and failing <= {f"{unit} · aten.convolution", f"{unit} · aten.convolution_backward"}


def test_op_sights_cover_every_fault():
    assert set(OP_SIGHTS) == set(FAULTS)
    for name in BUGS:
        sight = OP_SIGHTS[name]
        assert sight.how and not sight.blind  # every registry bug is seen on the harness' DenseNet-BCs


@pytest.mark.parametrize("name", BUGS)
def test_fault_is_an_op_finding_at_the_expected_op(name):
    net, unit, x, y = _planted(name)
    r = run_fault_ops(net, name + f"@{unit}", unit, x, y)
    assert r.expected == "finding" and r.found and r.localized and r.ok, r.to_json()
    sight = op_sight(name, dict(net.named_modules())[unit])
    module, _, op = r.op.partition(" · ")
    assert module == unit or module.startswith(f"{unit}.")
    if sight.ops:
        assert op.removeprefix("aten.").split(".")[0].split(" ")[0] in sight.ops  # "... (this side only)"
    assert r.kind in ("value", "shape", "side-only", "missing", "nonfinite")


def test_a_missing_gradient_path_is_blind_to_the_op_engine_and_says_why():
    """Without a bottleneck, the detached checkpointed layer leaves no op of its own in the side's backward: every
    op the side runs is right. Reported blind with the reason; the module engine catches it."""
    torch.manual_seed(0)
    net = DenseNet(depth=10, growth_rate=4, bottleneck=False, memory_efficient=True)
    unit = "block3.layer02"
    assert op_sight("checkpoint_detached_inputs", dict(net.named_modules())[unit]).blind
    x, y = harness_batch(2, 0)
    r = run_fault_ops(net, f"checkpoint_detached_inputs@{unit}", unit, x, y)
    assert r.expected == "blind" and not r.found and r.ok and "module units" in r.note
    assert diff(net, x, y, f"native+fault:checkpoint_detached_inputs@{unit}", "native").verdict == "mismatch"


def test_cli_selftest_ops_exit_zero_with_the_op_engine_in_json(tmp_path, capsys):
    out = tmp_path / "st.json"
    code = main(["selftest", "--ops", "--model", MODEL, "--batch", "2", "--no-gradcheck", "--faults",
                 "cat_backward_slice_offset", "tf32_round", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    ops = {f["name"]: f["ops"] for f in data["faults"]}
    assert ops["cat_backward_slice_offset"]["found"] and ops["cat_backward_slice_offset"]["op"].endswith(
        "aten.slice.Tensor")
    assert ops["tf32_round"]["expected"] == "agree" and not ops["tf32_round"]["found"]
    assert "op engine: 1/1 faults found" in capsys.readouterr().out


def test_cli_selftest_ops_exit_one_when_the_op_engine_finds_a_fault_elsewhere(tmp_path, monkeypatch):
    """The module engine catches the fault; the op engine's finding is not at the op it must be: exit 1."""
    monkeypatch.setitem(OP_SIGHTS, "cat_backward_slice_offset", registry.OpSight(("mm",), "wanted at a matmul"))
    out = tmp_path / "st.json"
    code = main(["selftest", "--ops", "--model", MODEL, "--batch", "2", "--no-gradcheck", "--faults",
                 "cat_backward_slice_offset", "--json", str(out)])
    assert code == 1
    entry = json.loads(out.read_text())["faults"][0]
    assert entry["detected"] and entry["ops"]["found"] and not entry["ops"]["localized"] and not entry["ok"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", CONTROLS)
def test_cuda_controls_below_the_capture_are_agreed_by_both_engines(name):
    """On CUDA autograd runs backward on its device thread: the planted node is still recognised there (the
    replay reproduces the side's own values, on deterministic cuDNN) and both engines agree with the control."""
    net, unit, x, y = _planted(name)
    be = parse_backend(f"cudnn-deterministic+fault:{name}@{unit}")
    side = side_capture(net, x, y, be)
    records = _conv_records(side, unit)
    assert [r.op for r in records] == ["aten.convolution.default", "aten.convolution_backward.default"]
    backward = records[1]
    with be.active(), torch.no_grad(), running_unit(unit):
        again = rebuild_call(backward, [v.clone() for v in backward.input_values]).run()
    assert all(torch.equal(a, o) for a, o in zip(again, backward.output_values) if o is not None)
    assert judge_ops(net, x, y, be).verdict == "agree"
    assert diff(net, x, y, f"cudnn+fault:{name}@{unit}", "cudnn", device="cuda").verdict == "agree"
