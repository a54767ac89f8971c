"""Custom autograd Functions in fixtures (schema 3): recorded with their float64 truth, judged as units of their own.

A user's model (written here, functional style) applies two custom Functions: ``_Gate`` inside the leaf module
``gate`` and ``_Scale`` in the model's own forward, between ``conv1`` and ``conv2`` (not inside any leaf unit).
Each backward can be broken in every dtype (float64 included) by a module-level switch, so ``diff``-style
self-consistency cannot see it: only the stored truth can.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from densenet_debug.reference.check import check_reference
from densenet_debug.reference.format import read_fixture
from densenet_debug.reference.meta import SCHEMA, SCHEMA_NO_FUNCTIONS, FixtureError
from densenet_debug.reference.record import record_reference

# factors on one channel of each backward (1.0: the correct backward); skip: the forward applies no _Scale
FAULT: dict = {"gate": 1.0, "scale": 1.0, "skip": False}


class _Gate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x * 2.0

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        g = g * 2.0
        if FAULT["gate"] != 1.0:
            g = g.clone()
            g[:, 1] *= FAULT["gate"]
        return g


class _Scale(torch.autograd.Function):
    """Identity forward; its backward hands channel 3 back scaled (wrong unless the factor is 1)."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        if FAULT["scale"] == 1.0:
            return g
        g = g.clone()
        g[:, 3] *= FAULT["scale"]
        return g


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Gate.apply(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.gate = Gate()
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.conv1(x))
        b = a.clone() if FAULT["skip"] else _Scale.apply(a)  # in the top-level forward, inside no leaf unit
        h = torch.cat((a, self.gate(self.conv2(b))), 1)
        return self.fc(h.mean((2, 3)))


class Plain(nn.Module):
    """The same shape of model with no custom Function."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(autouse=True)
def _correct_backwards():
    FAULT.update(gate=1.0, scale=1.0, skip=False)
    yield
    FAULT.update(gate=1.0, scale=1.0, skip=False)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 4, (2,), generator=g)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Net]:
    torch.manual_seed(0)
    model = Net()
    x, y = _batch()
    path = record_reference(model, x, y, tmp_path_factory.mktemp("fn") / "net", policy="full")
    return path, model


def test_function_calls_are_stored_with_their_truth_and_named_in_meta(recorded: tuple[Path, Net]) -> None:
    path, _ = recorded
    meta = json.loads((path / "meta.json").read_text())
    assert meta["schema"] == SCHEMA and meta["functions"]["stored"] is True
    assert meta["functions"]["calls"] == [["(model) · _Scale", "gate · _Gate"]]
    step = json.loads((path / "index.json").read_text())["steps"][0]
    assert [(c["module"], c["class"], c["occurrence"]) for c in step["functions"]] == [("", "_Scale", 0),
                                                                                      ("gate", "_Gate", 0)]
    fx = read_fixture(path)
    scale = fx.traces[0].functions[0]
    # the stored truth is the float64 one: identity forward, the correct (unscaled) gradient handed back
    assert scale.inputs[0].dtype == torch.float64 and torch.equal(scale.outputs[0], scale.inputs[0])
    assert torch.equal(scale.grad_inputs[0], scale.grad_outputs[0])
    assert fx.traces[0]["conv2"].inputs[0].shape == scale.outputs[0].shape


def test_a_model_without_functions_writes_schema_2_with_no_functions_section(tmp_path: Path) -> None:
    x, y = _batch()
    torch.manual_seed(0)
    path = record_reference(Plain(), x, y.clamp(max=2), tmp_path / "plain", policy="full")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["schema"] == SCHEMA_NO_FUNCTIONS and "functions" not in meta
    assert "functions" not in json.loads((path / "index.json").read_text())["steps"][0]
    assert not getattr(read_fixture(path).traces[0], "functions", None)


def test_correct_functions_agree_and_each_call_is_judged(recorded: tuple[Path, Net]) -> None:
    path, model = recorded
    result = check_reference(path, "native", model=model)
    assert result.verdict == "agree", result.message()
    judged = {r.layer for r in result.rows if r.mode == "function" and r.note == ""}
    assert judged == {"(model) · _Scale", "gate · _Gate"}


def test_a_wrong_backward_inside_a_leaf_module_is_reported_at_the_function(recorded: tuple[Path, Net]) -> None:
    path, model = recorded
    FAULT["gate"] = 1.01  # every dtype
    result = check_reference(path, "native", model=model)
    assert result.verdict == "mismatch"
    first = result.first_divergence
    assert (first.layer, first.pass_, first.mode) == ("gate · _Gate", "backward", "function"), result.message()
    assert "first at custom autograd Function _Gate in gate (backward grad_input, function" in result.summary
    gate = [r for r in result.rows if r.layer == "gate" and r.status == "mismatch"]
    assert gate and all(r.explained_by == "gate · _Gate" for r in gate)


def test_a_wrong_backward_in_the_top_level_forward_is_reported_at_the_function(recorded: tuple[Path, Net]) -> None:
    path, model = recorded
    FAULT["scale"] = 2.0  # every dtype: the side and the model's own float64 agree with each other
    result = check_reference(path, "native", model=model)
    assert result.verdict == "mismatch"
    first = result.first_divergence
    assert (first.layer, first.pass_, first.mode) == ("(model) · _Scale", "backward", "function"), result.message()
    assert "custom autograd Function _Scale in the model's own forward (backward grad_input" in result.summary
    # the stored truth's between check fails there too, and is explained by the Function
    between = [r for r in result.reproduction if r.mode == "between" and r.status == "mismatch"]
    assert between and all(r.explained_by == "(model) · _Scale" for r in between)


def test_a_stored_call_the_model_no_longer_makes_is_a_note(recorded: tuple[Path, Net]) -> None:
    path, model = recorded
    FAULT["skip"] = True  # the same model, whose forward no longer applies _Scale (the same values: a clone)
    result = check_reference(path, "native", model=model)
    assert result.verdict == "agree", result.message()
    notes = [r for r in result.rows if r.layer == "(model) · _Scale"]
    assert notes and all(r.status == "ok" and "applies no such call" in r.note for r in notes)


def test_functions_in_a_schema_2_meta_are_refused(recorded: tuple[Path, Net], tmp_path: Path) -> None:
    import shutil

    path, _ = recorded
    edited = tmp_path / "edited"
    shutil.copytree(path, edited)
    meta = json.loads((edited / "meta.json").read_text())
    meta["schema"] = SCHEMA_NO_FUNCTIONS
    (edited / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FixtureError, match="field functions is not part of schema"):
        read_fixture(edited)
    del meta["functions"]
    (edited / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FixtureError, match="holds custom Function calls but meta.json says none are stored"):
        read_fixture(edited)


def test_checkpoints_policy_recomputes_the_calls_and_reproduction_sees_a_changed_backward(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    x, y = _batch()
    path = record_reference(model, x, y, tmp_path / "ckpt", policy="checkpoints")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["schema"] == SCHEMA and meta["functions"]["stored"] is False
    assert meta["functions"]["calls"] == [["(model) · _Scale", "gate · _Gate"]]
    assert "functions" not in json.loads((path / "index.json").read_text())["steps"][0]
    agree = check_reference(path, "native", model=model)
    assert agree.verdict == "agree", agree.message()
    assert {r.layer for r in agree.rows if r.mode == "function"} == {"(model) · _Scale", "gate · _Gate"}
    FAULT["scale"] = 2.0  # the recomputed float64 step has it too: the stored checkpoints do not
    changed = check_reference(path, "native", model=model)
    assert changed.verdict == "mismatch" and changed.first_divergence.mode == "reproduction", changed.message()


class _Twice(torch.autograd.Function):
    """cat((x, 2x), 1) with a hand-written backward: its grad_input is a sum of two narrowed slices."""

    @staticmethod
    def forward(ctx, x, k):  # noqa: ANN001, ANN205
        ctx.c = x.shape[1]
        return torch.cat((x, k * x), 1)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return g[:, :ctx.c] + 2.0 * g[:, ctx.c:], None


class TwiceNet(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, c, 3, padding=1)
        self.fc = nn.Linear(2 * c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _Twice.apply(self.conv(x), 2.0)
        return self.fc(F.relu(h).mean((2, 3)))


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=st.integers(1, 4), side=st.integers(3, 6), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_stored_calls_round_trip_bit_exact(tmp_path: Path, c: int, side: int, batch: int, seed: int) -> None:
    from densenet_debug.reference.record import one_thread_oracle

    torch.manual_seed(seed)
    model = TwiceNet(c)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 2, side, side, generator=g), torch.randint(0, 3, (batch,), generator=g)
    path = record_reference(model, x, y, tmp_path / f"twice-{c}-{side}-{batch}-{seed}", policy="full",
                            check_oracle=False)
    truth = one_thread_oracle(model, x, y, keep_graph=False)[0].functions
    stored = read_fixture(path).traces[0].functions
    assert [s.label for s in stored] == [t.label for t in truth] == ["(model) · _Twice"]
    for s, t in zip(stored, truth):
        assert s.input_layouts == t.input_layouts and s.grad_output_layouts == t.grad_output_layouts
        for q in ("inputs", "outputs", "grad_outputs", "grad_inputs"):
            mine, theirs = getattr(s, q), getattr(t, q)
            assert len(mine) == len(theirs)
            assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(mine, theirs)), q
