"""NumPy float64 oracle: its ops match PyTorch's, the whole network matches fp64 PyTorch, faults show up."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from densenet_debug import build_model
from densenet_debug.errors import UsageError
from densenet_debug.models import Concat, DenseNet
from densenet_debug.numpy_oracle import compare_with_torch, numpy_forward_backward, ops
from densenet_debug.numpy_oracle.compare import relative_error
from densenet_debug.trace import trace_step

REL = 1e-10  # the bar for NumPy vs PyTorch fp64, end to end


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy().copy() for k, v in model.state_dict().items()}


def _assert_network_agrees(model: DenseNet, n: int, seed: int, train: bool = True, hw: int = 16) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.config["in_channels"], hw, hw, generator=g, dtype=torch.float64)
    y = torch.randint(0, model.config["num_classes"], (n,), generator=g)
    m64 = copy.deepcopy(model).double().train(train)
    state = _state(m64)
    trace = trace_step(m64, x, y)
    ours = numpy_forward_backward(state, model.config, x.numpy(), y.numpy(), train=train)
    assert abs(ours.loss - float(trace.loss)) <= REL * abs(float(trace.loss))
    assert relative_error(trace.output.numpy(), ours.logits) <= REL
    assert set(ours.units) == set(trace.units)
    for name, unit in ours.units.items():
        rec = trace[name]
        assert relative_error(rec.outputs[0].numpy(), unit.outputs[0]) <= REL, name
        for i, g in enumerate(rec.grad_inputs):
            if g is not None:
                assert relative_error(g.numpy(), unit.grad_inputs[i]) <= REL, (name, i)
        for k, g in rec.param_grads.items():
            assert relative_error(g.numpy(), unit.param_grads[k]) <= REL, (name, k)
        for k, b in unit.buffers_after.items():
            assert relative_error(rec.buffers_after[k].numpy(), b) <= REL, (name, k)


@settings(max_examples=6, deadline=None)
@given(config=st.sampled_from(["bc-10", "bc-16", "plain-10"]), n=st.integers(1, 3), seed=st.integers(0, 2**16),
       train=st.booleans())
def test_small_networks_match_pytorch_fp64(config: str, n: int, seed: int, train: bool) -> None:
    torch.manual_seed(seed)
    if config == "plain-10":  # plain DenseNet, compression 1
        model = DenseNet(depth=10, growth_rate=4, bottleneck=False, compression=1.0)
    else:
        model = build_model(f"densenet-{config}")
    if not train:
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k.endswith("running_var"):
                    b.uniform_(0.5, 2.0)
                elif k.endswith("running_mean"):
                    b.normal_()
    _assert_network_agrees(model, max(n, 2) if train else n, seed, train)


def test_densenet_bc_100_matches_pytorch_fp64() -> None:
    torch.manual_seed(0)
    _assert_network_agrees(build_model("densenet-bc-100"), 2, 0, hw=32)


# -- ops against torch.nn.functional -------------------------------------------------------------------------
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 5), o=st.integers(1, 4), hw=st.integers(3, 8), k=st.sampled_from([1, 3]),
       stride=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_conv2d_forward_backward(n: int, c: int, o: int, hw: int, k: int, stride: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    pad = k // 2
    x = torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(o, c, k, k, generator=g, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, w, stride=stride, padding=pad)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    yn, cache = ops.conv2d_forward(x.detach().numpy(), w.detach().numpy(), stride, pad)
    gxn, gwn = ops.conv2d_backward(gy.numpy(), cache)
    for a, b in ((y, yn), (gx, gxn), (gw, gwn)):
        assert a.shape == b.shape and relative_error(a.detach().numpy(), b) <= 1e-13


def test_pooling_linear_and_loss() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = F.avg_pool2d(x, 2)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    yn, cache = ops.avg_pool2d_forward(x.detach().numpy(), 2)
    assert relative_error(y.detach().numpy(), yn) <= 1e-15
    assert relative_error(torch.autograd.grad(y, x, gy)[0].numpy(), ops.avg_pool2d_backward(gy.numpy(), cache)) == 0
    logits = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 6, 3, 3])
    loss = F.cross_entropy(logits, target)
    ln, ce = ops.cross_entropy_forward(logits.detach().numpy(), target.numpy())
    assert abs(ln - loss.item()) <= 1e-15 * abs(loss.item())
    assert relative_error(torch.autograd.grad(loss, logits)[0].numpy(), ops.cross_entropy_backward(ce)) <= 1e-14


# -- the comparison and its verdicts -------------------------------------------------------------------------
def test_compare_agrees_on_correct_pytorch() -> None:
    torch.manual_seed(0)
    model = build_model("densenet-bc-16")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 10, (2,), generator=g)
    for train in (True, False):
        report = compare_with_torch(model, x, y, train=train)
        assert report.verdict == "agree", [r for r in report.rows if r.status != "ok"]
        data = report.to_json()
        assert data["schema"] == "densenet-debug/oracle/1" and data["first_divergence"] is None
        assert {"layer", "pass", "quantity", "error", "tolerance", "status"} <= set(data["rows"][0])
        assert report.propagated["max_relative_forward"] <= REL
        assert report.propagated["max_relative_backward"] <= REL
    quantities = {(r.layer, r.quantity) for r in report.rows}
    assert ("block1.layer02.cat", "grad_input1") in quantities and ("head.fc", "grad_weight") in quantities
    tols = [r.tolerance for r in report.rows if r.layer.endswith("conv2") and r.quantity == "output"]
    assert 0 < max(tols) < 1e-12  # derived from fp64 rounding, not a loose rtol


class _WrongCatBackward(torch.autograd.Function):
    """cat whose backward hands the last input the wrong slice offset by one channel (the #708 pattern)."""

    @staticmethod
    def forward(ctx, *xs):  # noqa: ANN002
        ctx.sizes = [x.shape[1] for x in xs]
        return torch.cat(xs, 1)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        parts = list(torch.split(g, ctx.sizes, 1))
        end = g.shape[1]
        parts[-1] = g[:, end - ctx.sizes[-1] - 1:end - 1]
        return tuple(parts)


class WrongConcat(Concat):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return _WrongCatBackward.apply(*xs)


def test_a_wrong_cat_backward_is_a_mismatch_at_that_layer() -> None:
    torch.manual_seed(0)
    model = build_model("densenet-bc-16")
    model.block2.layer02.cat = WrongConcat()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 10, (2,), generator=g)
    report = compare_with_torch(model, x, y)
    assert report.verdict == "mismatch"
    first = report.first_divergence
    assert (first["layer"], first["pass"], first["quantity"]) == ("block2.layer02.cat", "backward", "grad_input1")
    assert {r.layer for r in report.rows if r.status == "mismatch"} == {"block2.layer02.cat"}


@pytest.mark.gpu
def test_cuda_fp64_agrees_with_numpy() -> None:
    torch.manual_seed(0)
    model = build_model("densenet-bc-16").cuda()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 10, (2,), generator=g)
    report = compare_with_torch(model, x.cuda(), y.cuda())
    assert report.verdict == "agree", [r for r in report.rows if r.status != "ok"][:5]


def test_unsupported_models_are_usage_errors() -> None:
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    # any other model now runs op by op (tests/numpy_oracle/test_interpreter.py); our DenseNet's own path still
    # refuses what it cannot run
    report = compare_with_torch(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 2)), x, y)
    assert report.verdict == "agree" and report.environment["engine"] == "op-level interpreter"
    with pytest.raises(UsageError, match="dropout"):
        compare_with_torch(build_model("densenet-bc-10", drop_rate=0.1), x, y)
    with pytest.raises(UsageError, match="missing"):
        numpy_forward_backward({}, build_model("densenet-bc-10").config, x.numpy(), y.numpy())
