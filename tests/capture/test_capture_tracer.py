"""The Tracer on in-place and checkpointed models: no crash, and every record equals plain autograd.

The reference is an out-of-place twin (same weights) in float64: forward hooks keep each unit's first-call
inputs and outputs in the graph, then ``torch.autograd.grad`` gives the gradient w.r.t. each output
(grad_outputs); a copy of the unit rerun on detached inputs pulls them back through that unit only
(grad_inputs). A twin in train mode computes the same batch statistics, so the rerun is exact.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from capture_models import batch, build
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from densenet_debug.trace import Tracer, discover_units, flatten_tensors, trace_step

TOL = {"rtol": 1e-12, "atol": 1e-14}


def _reference(model: nn.Module, x: Tensor, y: Tensor, units: list[str]) -> dict[str, dict[str, list]]:
    """Per unit: grad_outputs and grad_inputs (through the unit only) by torch.autograd.grad."""
    modules = dict(model.named_modules())
    calls: dict[str, tuple[list, list[Tensor]]] = {}

    def keep(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            calls.setdefault(name, (list(args), flatten_tensors(output)))
        return hook

    handles = [modules[n].register_forward_hook(keep(n)) for n in units]
    try:
        loss = F.cross_entropy(model(x), y)
    finally:
        for h in handles:
            h.remove()
    ref: dict[str, dict[str, list]] = {}
    for name, (args, outs) in calls.items():
        live = [o for o in outs if o.requires_grad]
        gos = torch.autograd.grad(loss, live, retain_graph=True, allow_unused=True)
        ref[name] = {"grad_outputs": list(gos), "grad_inputs": _through_unit(modules[name], args, gos)}
    return ref


def _through_unit(module: nn.Module, args: list, grad_outputs: tuple) -> list[Tensor | None]:
    """Gradient w.r.t. each input through this unit only: rerun a copy on detached inputs, pull back."""
    fresh = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, Tensor) else a for a in args]
    outs = [o for o in flatten_tensors(copy.deepcopy(module)(*fresh)) if o.requires_grad]
    wanted = [a for a in fresh if isinstance(a, Tensor) and a.requires_grad]
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None]
    if not wanted or not pairs:
        return [None] * len(args)
    it = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
    return [next(it) if isinstance(a, Tensor) and a.requires_grad else None for a in fresh]


def _assert_trace_matches(style: str, seed: int, n: int, **kwargs: object) -> None:
    x, y = batch(n, seed)
    x = x.double()
    model = build(style, seed, **kwargs).double()
    twin_kwargs = {**kwargs, "inplace": False, "efficient": False} if style == "torchvision" else kwargs
    twin = build(style, seed, **twin_kwargs).double()
    units = discover_units(twin, x)
    trace = trace_step(model, x, y, units=units)
    ref = _reference(twin, x, y, units)
    assert set(trace.units) == set(ref)
    for name, expected in ref.items():
        rec = trace[name]
        assert rec.backward_index is not None, name
        for q in ("grad_outputs", "grad_inputs"):
            got = getattr(rec, q)
            assert len(got) == len(expected[q]), (name, q)
            for g, e in zip(got, expected[q]):
                assert (g is None) == (e is None), (name, q)
                if e is not None:
                    torch.testing.assert_close(g, e, **TOL, msg=f"{name} {q}")


@pytest.mark.parametrize("efficient", [False, True], ids=["inplace", "inplace-checkpointed"])
def test_inplace_model_traces_like_autograd_on_its_out_of_place_twin(efficient: bool) -> None:
    _assert_trace_matches("torchvision", 0, 3, efficient=efficient)


@pytest.mark.parametrize("style", ["functional", "catfn", "twice"])
def test_other_styles_trace_like_autograd(style: str) -> None:
    _assert_trace_matches(style, 1, 3)


@given(seed=st.integers(0, 2**16), n=st.integers(2, 4))
@settings(max_examples=6, deadline=None)
def test_inplace_trace_matches_autograd_for_any_seed_and_batch(seed: int, n: int) -> None:
    _assert_trace_matches("torchvision", seed, n, efficient=seed % 2 == 1)


def test_inplace_records_keep_values_from_before_the_mutation() -> None:
    """relu1's input (norm1's output) is overwritten in place; its record keeps the pre-ReLU values."""
    x, y = batch(3)
    model = build("torchvision").double()
    trace = trace_step(model, x.double(), y)
    bn_out = trace["layers.0.norm1"].outputs[0]
    relu_in, relu_out = trace["layers.0.relu1"].inputs[0], trace["layers.0.relu1"].outputs[0]
    assert (bn_out < 0).any() and torch.equal(bn_out, relu_in)
    assert torch.equal(relu_out, relu_in.clamp_min(0))


def test_checkpoint_recompute_is_not_recorded_again() -> None:
    x, y = batch(3)
    trace = trace_step(build("torchvision", efficient=True), x, y)
    assert all(rec.calls == 1 for rec in trace)
    assert len(set(trace.backward_order)) == len(trace)


def test_a_unit_called_twice_records_its_first_call() -> None:
    x, y = batch(3)
    model = build("twice").double()
    units = discover_units(model, x.double())
    trace = trace_step(model, x.double(), y, units=units)
    assert trace["shared"].calls == 2
    ref = _reference(build("twice").double(), x.double(), y, units)
    torch.testing.assert_close(trace["shared"].grad_outputs[0], ref["shared"]["grad_outputs"][0], **TOL)
    torch.testing.assert_close(trace["shared"].grad_inputs[0], ref["shared"]["grad_inputs"][0], **TOL)


def test_a_unit_called_twice_keeps_its_first_calls_share_of_each_parameter_gradient() -> None:
    """.grad sums both calls; the first call's share is what a replay of that call computes."""
    x, y = batch(3)
    model = build("twice").double()
    units = discover_units(model, x.double())
    trace = trace_step(model, x.double(), y, units=units)
    rec, shared = trace["shared"], dict(model.named_modules())["shared"]
    assert sorted(rec.call_param_grads) == ["bias", "weight"]
    first = torch.func.functional_call(shared, dict(shared.named_parameters()), (rec.inputs[0],))
    share = torch.autograd.grad(first, list(shared.parameters()), rec.grad_outputs[0])
    for (name, _), mine in zip(shared.named_parameters(), share):
        torch.testing.assert_close(rec.call_param_grads[name], mine, **TOL)
        assert not torch.allclose(rec.param_grads[name], mine)  # the second call's share is not zero
    assert all(not r.call_param_grads for r in trace if r.calls == 1)  # once: .grad is the share


def test_cat_backward_slice_keeps_its_708_layout() -> None:
    """The last layer's conv2 only feeds the final cat: its grad_output is a strided slice of cat's grad."""
    x, y = batch(3)
    trace = trace_step(build("torchvision"), x, y)
    layout = trace["layers.2.conv2"].grad_output_layouts[0]
    assert not layout.is_contiguous and layout.storage_offset > 0
    g = trace["layers.2.conv2"].grad_outputs[0]
    assert layout.size == tuple(g.shape)
    assert trace["layers.2.conv1"].grad_output_layouts[0].is_contiguous


def test_tracer_leaves_no_hooks_and_no_mode_behind() -> None:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    model = build("torchvision")
    x, y = batch(2)
    with Tracer(model):
        F.cross_entropy(model(x), y).backward()
    assert _get_current_dispatch_mode() is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
