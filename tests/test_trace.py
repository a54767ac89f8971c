"""Tracing: completeness, agreement with autograd, hook removal, subsets, user models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from densenet_debug.trace import QUANTITIES, Tracer, discover_units, trace_step


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        and not m._backward_pre_hooks
        for m in model.modules()
    )


def test_every_leaf_unit_is_traced_completely(tiny_model, batch) -> None:
    model = tiny_model()
    x, y = batch()
    trace = trace_step(model, x, y)
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
    assert set(trace.units) == set(leaves)
    for rec in trace:
        assert rec.outputs and all(o is not None for o in rec.outputs), rec.name
        assert rec.grad_outputs and rec.grad_outputs[0] is not None, rec.name
        assert rec.backward_index is not None
        for pname, p in dict(model.named_modules())[rec.name].named_parameters(recurse=False):
            assert torch.equal(rec.param_grads[pname], p.grad), (rec.name, pname)
    assert trace.forward_order[0] == "stem" and trace.backward_order[0] == "head.fc"
    assert trace["stem"].grad_inputs == [None]  # the image needs no gradient
    bn = trace["block1.layer01.norm1"]
    assert not torch.equal(bn.buffers_before["running_mean"], bn.buffers_after["running_mean"])
    assert _no_hooks(model)


def test_records_agree_with_autograd(tiny_model, batch) -> None:
    """A conv's grad_output is exactly the slice of the next cat's grad that autograd gives it."""
    model = tiny_model().double()
    x, y = batch()
    trace = trace_step(model, x.double(), y)
    cat = trace["block1.layer02.cat"]
    assert len(cat.inputs) == 2 and len(cat.grad_inputs) == 2
    conv2 = trace["block1.layer01.conv2"]
    assert torch.equal(cat.inputs[1], conv2.outputs[0])
    # conv2's output feeds block1.layer02.cat and block1.cat: its grad_output is the sum of their slices.
    total = cat.grad_inputs[1] + trace["block1.cat"].grad_inputs[1]
    assert torch.allclose(conv2.grad_outputs[0], total, rtol=1e-12, atol=0)
    relu = trace["block1.layer01.relu1"]
    expected = relu.grad_outputs[0] * (relu.inputs[0] > 0)
    assert torch.equal(relu.grad_inputs[0], expected)


def test_hooks_removed_even_when_the_step_raises(tiny_model) -> None:
    model = tiny_model()
    with pytest.raises(RuntimeError), Tracer(model):
        model(torch.randn(2, 5, 32, 32))  # wrong channel count
    assert _no_hooks(model)


@given(names=st.sets(st.sampled_from(["stem", "block1.layer01.conv1", "block2.cat", "head.fc", "trans1.pool"]),
                     min_size=1),
       record=st.sets(st.sampled_from(QUANTITIES), min_size=1))
@settings(max_examples=15, deadline=None)
def test_subset_of_units_and_quantities(names: set[str], record: set[str]) -> None:
    torch.manual_seed(0)
    from densenet_debug import build_model

    model = build_model("densenet-bc-10")
    trace = trace_step(model, torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), units=names, record=record)
    assert set(trace.units) == names
    for rec in trace:
        assert bool(rec.inputs) == ("inputs" in record)
        assert bool(rec.grad_outputs) == ("grad_outputs" in record)
        has_params = rec.name in ("stem", "block1.layer01.conv1", "head.fc")
        assert bool(rec.param_grads) == ("param_grads" in record and has_params)
    assert _no_hooks(model)


def test_unknown_unit_and_quantity_are_refused(tiny_model) -> None:
    with pytest.raises(KeyError):
        Tracer(tiny_model(), units=["nope"])
    with pytest.raises(ValueError):
        Tracer(tiny_model(), record=["activations"])


def test_memory_efficient_trace_equals_normal_trace(tiny_model, batch) -> None:
    x, y = batch(3)
    normal = tiny_model().double()
    efficient = tiny_model(memory_efficient=True).double()
    t1, t2 = trace_step(normal, x.double(), y), trace_step(efficient, x.double(), y)
    assert t1.units.keys() == t2.units.keys()
    for name in t1.units:
        a, b = t1[name], t2[name]
        assert b.calls == 1, name  # the checkpoint recompute is not recorded again
        pairs = ((a.outputs, b.outputs), (a.grad_outputs, b.grad_outputs), (a.grad_inputs, b.grad_inputs))
        for qa, qb in pairs:
            for ta, tb in zip(qa, qb):
                assert (ta is None) == (tb is None)
                if ta is not None:
                    assert torch.allclose(ta, tb, rtol=1e-12, atol=1e-15), name


class UserNet(nn.Module):
    """A user model with functional ops in a non-leaf forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.inner = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.conv(x))
        b = torch.cat([a, self.inner(a)], 1)
        return self.fc(b.mean((2, 3)))


def test_discover_units_finds_composites_with_their_own_math() -> None:
    model = UserNet()
    units = discover_units(model, torch.randn(2, 3, 8, 8))
    assert units == ["", "conv", "inner.0", "inner.1", "fc"]
    assert "inner" not in units  # a Sequential only calls children
    # discovery leaves no trace behind and does not move BN statistics
    assert _no_hooks(model)


def test_discover_units_keeps_bn_state(tiny_model) -> None:
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    units = discover_units(model, torch.randn(2, 3, 32, 32))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert set(units) == {n for n, m in model.named_modules() if n and not list(m.children())}


def test_in_place_change_after_recording_is_detected() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    x = torch.randn(2, 3)
    with Tracer(model, record=("inputs", "outputs")) as tracer:
        out = model(x)
    with torch.no_grad():
        out.mul_(2)  # the recorded output of the last unit changes under our feet
    with pytest.raises(RuntimeError, match="modified in place"):
        tracer.trace()


@pytest.mark.gpu
def test_trace_on_cuda_matches_cpu(tiny_model, batch) -> None:
    x, y = batch()
    cpu = tiny_model().double()
    gpu = tiny_model().double().cuda()
    t_cpu = trace_step(cpu, x.double(), y)
    t_gpu = trace_step(gpu, x.double().cuda(), y.cuda(), to_cpu=True)
    for name in t_cpu.units:
        for a, b in zip(t_cpu[name].grad_outputs, t_gpu[name].grad_outputs):
            assert b.device.type == "cpu"
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name


def test_layouts_are_recorded_and_reproducible(tiny_model, batch) -> None:
    """The last layer of a block gets a cat-backward slice: non-contiguous, with a storage offset (#708)."""
    from densenet_debug.trace import with_layout

    x, y = batch(4)
    trace = trace_step(tiny_model(), x, y)
    last = trace["block1.layer02.conv2"]
    layout = last.grad_output_layouts[0]
    assert not layout.is_contiguous and layout.storage_offset > 0
    assert trace["block1.layer01.conv1"].grad_output_layouts[0].is_contiguous
    g = last.grad_outputs[0]
    assert g.is_contiguous()  # records are compact copies ...
    replay = with_layout(g, layout)  # ... and a replay can put them back where the backend saw them
    assert torch.equal(replay, g)
    assert replay.stride() == layout.stride and replay.storage_offset() == layout.storage_offset
    assert trace["block1.layer02.cat"].input_layouts[1] is not None
