"""Op-level capture on models in every user style: attribution, alignment, layouts, values, kinks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from capture_models import batch, build
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from densenet_debug.capture import Capture, align, capture, kink_sites
from densenet_debug.capture.records import OUTSIDE, TensorLayout

STYLES = {"torchvision": {}, "torchvision-checkpointed": {"efficient": True}, "functional": {}, "twice": {},
          "catfn": {}}
# What channels_last adds around adaptive_avg_pool2d(1): an as_strided_ and its AsStridedBackward node.
LAYOUT_GLUE = {"aten.as_strided_.default", "aten.as_strided.default", "aten.squeeze.dim", "aten.new_zeros.default",
               "aten.copy_.default"}


def _step(style: str, *, values: bool = False, dtype: torch.dtype = torch.float32, channels_last: bool = False,
          seed: int = 0, n: int = 3) -> tuple[Capture, nn.Module]:
    model = build(style.split("-")[0], seed, **STYLES[style]).to(dtype)
    x, y = batch(n, seed)
    x = x.to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.zero_grad(set_to_none=True)
    with capture(model, values=values) as cap:
        F.cross_entropy(model(x), y).backward()
    return cap, model


@pytest.mark.parametrize("style", STYLES)
def test_every_backward_op_is_attributed_to_a_module(style: str) -> None:
    cap, model = _step(style)
    paths = {name for name, _ in model.named_modules()}
    loss_keys = {r.key for r in cap.phase("forward") if r.module == OUTSIDE}
    backward = cap.phase("backward") + cap.phase("accumulate")
    assert backward
    for r in backward:
        assert r.node is not None and r.creator is not None, r
        if r.module == OUTSIDE:  # only the loss and its seed run outside the model
            assert r.creator in loss_keys, r
        else:
            assert r.module in paths, r
    with_params = {name for name, m in model.named_modules() if list(m.parameters(recurse=False))}
    assert with_params <= {r.module for r in cap.phase("backward")}


@pytest.mark.parametrize("style", STYLES)
def test_capture_leaves_nothing_behind_and_changes_no_gradient(style: str) -> None:
    plain = build(style.split("-")[0], 0, **STYLES[style])
    x, y = batch(3)
    F.cross_entropy(plain(x), y).backward()
    _, captured = _step(style, values=True)
    for (name, p), q in zip(plain.named_parameters(), captured.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert torch.autograd.Function.__dict__["apply"].__func__.__qualname__ == "Function.apply"
    assert _get_current_dispatch_mode() is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in captured.modules())


def test_values_do_not_change_the_stream() -> None:
    """The tool's own copies are never captured: the stream with values equals the stream without."""
    a, _ = _step("torchvision-checkpointed")
    b, _ = _step("torchvision-checkpointed", values=True)
    assert [r.key for r in a] == [r.key for r in b]


@given(seed=st.integers(0, 2**16), n=st.integers(2, 4), style=st.sampled_from(["torchvision", "functional"]))
@settings(max_examples=4, deadline=None)
def test_onednn_on_and_off_and_fp64_align_completely(seed: int, n: int, style: str) -> None:
    on, _ = _step(style, seed=seed, n=n)
    with torch.backends.mkldnn.flags(enabled=False):
        off, _ = _step(style, seed=seed, n=n)
    fp64, _ = _step(style, seed=seed, n=n, dtype=torch.float64)
    for other in (off, fp64):
        al = align(on, other)
        assert al.matched_fraction == 1.0 and not al.only_a and not al.only_b
        assert all(a.op == b.op and a.module == b.module for a, b in al.pairs)


def test_channels_last_aligns_except_listed_layout_glue() -> None:
    native, _ = _step("torchvision")
    cl, _ = _step("torchvision", channels_last=True)
    al = align(native, cl)
    assert not al.only_a and al.only_b
    assert {r.op for r in al.only_b} <= LAYOUT_GLUE
    assert all(r.node is None or r.node.name.startswith("AsStridedBackward") for r in al.only_b)
    assert len(al.pairs) == len(native) and al.layout_changes  # same math, other strides


def test_in_place_inputs_are_recorded_before_the_write() -> None:
    cap, model = _step("torchvision", values=True, dtype=torch.float64)
    relus = [r for r in cap.phase("forward") if r.op == "aten.relu_.default"]
    assert len(relus) == 2 * 3 + 1  # two nn.ReLU(inplace=True) per layer, the final F.relu(inplace=True)
    for r in relus:
        assert r.written == (0,)
        x, out = r.input_values[0], r.output_values[0]
        assert (x < 0).any() and torch.equal(out, x.clamp_min(0)), r.label
    bn = next(r for r in cap.phase("forward") if r.op == "aten.native_batch_norm.default")
    assert (bn.output_values[0] < 0).any()  # BN's output, overwritten by relu_ later, keeps its values
    mean_before = bn.input_values[3]  # running_mean: written without a schema annotation
    assert torch.equal(mean_before, torch.zeros_like(mean_before))
    assert not torch.equal(mean_before, model.layers[0].norm1.running_mean)


def test_cat_backward_slice_reaches_convolution_backward_with_its_708_layout() -> None:
    cap, _ = _step("torchvision")
    last = [r for r in cap.phase("backward") if r.op == "aten.convolution_backward.default"
            and r.module == "layers.2.conv2"]
    assert len(last) == 1
    grad_out: TensorLayout = last[0].input_layouts[0]
    assert not grad_out.is_contiguous and grad_out.storage_offset > 0
    first = next(r for r in cap.phase("backward") if r.op == "aten.convolution_backward.default"
                 and r.module == "layers.2.conv1")
    assert first.input_layouts[0].is_contiguous


def test_checkpoint_recompute_is_keyed_as_the_forward_it_repeats() -> None:
    cap, _ = _step("torchvision-checkpointed")
    recomputed = cap.phase("recompute")
    forward = {r.key: r for r in cap.phase("forward")}
    assert recomputed
    for r in recomputed:
        if r.repeats is None:  # checkpoint's pack hook detaches what it saves; the forward has no twin
            assert r.op == "aten.detach.default", r
        else:
            assert forward[r.repeats].op == r.op and forward[r.repeats].module == r.module, r
    repeated = {(r.module, r.op) for r in recomputed if r.repeats is not None}
    for i in range(3):  # every bottleneck is replayed up to what conv1's backward needs (early stop)
        assert {(f"layers.{i}", "aten.cat.default"), (f"layers.{i}.norm1", "aten.native_batch_norm.default"),
                (f"layers.{i}.relu1", "aten.relu_.default")} <= repeated
    cats = [r for r in recomputed if r.op == "aten.cat.default"]
    assert {r.module for r in cats} == {"layers.0", "layers.1", "layers.2"}  # a method of the layer, not root


def test_custom_function_ops_and_nodes_are_named() -> None:
    cap, _ = _step("catfn")
    fwd = [r for r in cap.phase("forward") if r.function == "CatFn"]
    assert [r.op for r in fwd] == ["aten.cat.default"] * 2
    bwd = [r for r in cap.phase("backward") if r.function == "CatFn"]
    assert bwd and all(r.creator[0] == "function" and r.creator[2] == "CatFn" for r in bwd)
    assert {r.creator[3] for r in bwd} == {0, 1} and {r.op for r in bwd} == {"aten.slice.Tensor"}


def test_a_module_called_twice_has_two_occurrences_forward_and_backward() -> None:
    cap, _ = _step("twice")
    convs = [r for r in cap.phase("forward") if r.op == "aten.convolution.default" and r.module == "shared"]
    assert [r.key[-1] for r in convs] == [0, 1]
    grads = [r for r in cap.phase("backward") if r.op == "aten.convolution_backward.default"
             and r.module == "shared"]
    assert sorted(r.creator for r in grads) == sorted(r.key for r in convs)


def test_fan_out_sums_are_accumulation_not_node_math() -> None:
    cap, _ = _step("torchvision")
    sums = [r for r in cap.phase("accumulate") if r.node.name != "torch::autograd::AccumulateGrad"]
    assert sums and {r.op for r in sums} <= {"aten.add.Tensor", "aten.add_.Tensor"}
    params = [r for r in cap.phase("accumulate") if r.node.name == "torch::autograd::AccumulateGrad"]
    assert {r.creator[1] for r in params} == {n for n, _ in build("torchvision").named_parameters()}


class _Kinky(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(x), 2).clamp(-1.0, 0.5).sum()


@given(seed=st.integers(0, 2**16), margin=st.floats(1e-3, 0.5))
@settings(max_examples=10, deadline=None)
def test_kink_sites_count_the_elements_within_the_margin(seed: int, margin: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    x[0, 0, :2, :2] = torch.tensor([[0.7, 0.7 + margin / 2], [-1.0, -1.0]])  # a near tie in the first window
    x.requires_grad_(True)
    model = _Kinky()
    with capture(model, values=True) as cap:
        model(x).backward()
    sites = {s.op: s for s in kink_sites(cap, margin)}

    def count(op: str) -> int:
        return sites[op].count if op in sites else 0

    near_zero = int((x.detach().abs() <= margin).sum())
    assert count("aten.relu.default") == near_zero
    assert count("aten.threshold_backward.default") == near_zero  # measured on the pre-activation
    if near_zero:
        assert sites["aten.relu.default"].total == x.numel()
        assert sites["aten.relu.default"].closest == float(x.detach().abs().min())
    assert count("aten.max_pool2d_with_indices.default") >= 1
    assert count("aten.max_pool2d_with_indices_backward.default") == count("aten.max_pool2d_with_indices.default")
    pooled = F.max_pool2d(F.relu(x.detach()), 2)
    assert count("aten.clamp.default") == int(torch.minimum((pooled + 1).abs(), (pooled - 0.5).abs()).le(margin).sum())


def test_a_tracer_inside_a_capture_adds_no_op() -> None:
    """The Tracer's own detaches and copies (forward and node hooks) are not ops of the model's step."""
    from densenet_debug.trace import trace_step

    alone, _ = _step("torchvision")
    model = build("torchvision")
    x, y = batch(3)
    with capture(model) as cap:
        trace_step(model, x, y)
    assert [r.key for r in cap] == [r.key for r in alone]


@pytest.mark.gpu
def test_capture_on_cuda_attributes_backward_ops_run_on_the_device_thread() -> None:
    """CUDA backward runs on autograd's device thread: the mode and node numbers must still reach it."""
    model = build("torchvision", efficient=True).cuda()
    x, y = batch(3)
    with capture(model) as cap:
        F.cross_entropy(model(x.cuda()), y.cuda()).backward()
    backward = cap.phase("backward")
    assert backward and all(r.creator is not None for r in backward)
    assert cap.phase("recompute") and all(r.module != OUTSIDE for r in cap.phase("recompute"))
    assert all(lo.device.startswith("cuda") for r in backward for lo in r.input_layouts)
