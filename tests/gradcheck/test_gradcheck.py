"""Numerical gradient checker: planted faults are caught and localized, correct units pass, kinks are kinks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from densenet_debug import build_model
from densenet_debug.gradcheck.engine import gradcheck_model, gradcheck_unit
from densenet_debug.gradcheck.report import SCHEMA
from densenet_debug.models import Concat

# -- planted faults -----------------------------------------------------------------------------------------
FAULTS = ["scale:1", "scale:1e-2", "scale:1e-3", "roll", "swap"]


def _plant(g: torch.Tensor, fault: str, channel: int = 1) -> torch.Tensor:
    """A wrong gradient: one channel scaled by (1 + r), a channel roll for samples >= 1, or a sample swap."""
    g = g.clone()
    if fault.startswith("scale:"):
        g[:, channel] *= 1 + float(fault.split(":")[1])
    elif fault == "roll":
        g[1:] = torch.roll(g[1:], 1, dims=1)
    elif fault == "swap":
        g[[0, 1]] = g[[1, 0]]
    return g


class _FaultyConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, padding, fault, target):  # noqa: ANN001
        ctx.save_for_backward(x, w)
        ctx.padding, ctx.fault, ctx.target = padding, fault, target
        return F.conv2d(x, w, padding=padding)

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001
        x, w = ctx.saved_tensors
        gx = torch.nn.grad.conv2d_input(x.shape, w, gy, padding=ctx.padding)
        gw = torch.nn.grad.conv2d_weight(x, w.shape, gy, padding=ctx.padding)
        if ctx.target == "input":
            gx = _plant(gx, ctx.fault)
        else:
            gw = _plant(gw.transpose(0, 1), ctx.fault).transpose(0, 1) if ctx.fault != "roll" else gw
        return gx, gw, None, None, None


class FaultyConv(nn.Conv2d):
    """A conv whose backward is wrong in a planted way (a custom autograd op, like a buggy backend kernel)."""

    fault = "scale:1e-3"
    target = "input"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FaultyConvFn.apply(x, self.weight, self.padding, self.fault, self.target)


class _FaultyReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fault):  # noqa: ANN001
        y = x.clamp_min(0)
        ctx.save_for_backward(y)
        ctx.fault = fault
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001
        (y,) = ctx.saved_tensors
        return _plant(gy * (y > 0), ctx.fault), None


class FaultyReLU(nn.Module):
    fault = "scale:1e-3"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FaultyReLUFn.apply(x, self.fault)


class _FaultyFn(torch.autograd.Function):
    """Runs a module; the backward is that module's true backward with a fault planted in one gradient."""

    @staticmethod
    def forward(ctx, box, x, *params):  # noqa: ANN001
        ctx.box = box
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return box.call(x, params)

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001
        box = ctx.box
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in ctx.saved_tensors]
            grads = list(torch.autograd.grad(box.call(leaves[0], leaves[1:]), leaves, gy))
        i = 0 if box.target == "input0" else 1 + box.names.index(box.target)
        g = grads[i].unsqueeze(0) if grads[i].dim() == 1 else grads[i]
        grads[i] = _plant(g, box.fault, box.channel).reshape(grads[i].shape)
        return None, *grads


class Faulty(nn.Module):
    """A leaf unit that computes like ``module`` (sharing its parameters); the gradient named ``target``
    (``input0`` or a parameter name) has ``fault`` planted in channel ``channel``."""

    def __init__(self, module: nn.Module, target: str, fault: str, channel: int = 1) -> None:
        super().__init__()
        self._inner = (module,)  # a tuple: not a child module, so this wrapper is the unit
        self.names = [n for n, _ in module.named_parameters()]
        self.buffer_names = [n for n, _ in module.named_buffers()]
        for n, p in module.named_parameters():
            self.register_parameter(n, p)
        for n, b in module.named_buffers():  # the wrapper's own, so .to() and the tracer see them
            self.register_buffer(n, b)
        self.target, self.fault, self.channel = target, fault, channel

    def call(self, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        state = {**dict(zip(self.names, params)), **{n: getattr(self, n) for n in self.buffer_names}}
        return torch.func.functional_call(self._inner[0], state, (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FaultyFn.apply(self, x, *[getattr(self, n) for n in self.names])


def _swap_conv(model: nn.Module, name: str, fault: str, target: str = "input") -> None:
    parent, _, leaf = name.rpartition(".")
    old = model.get_submodule(name)
    new = FaultyConv(old.in_channels, old.out_channels, old.kernel_size, padding=old.padding, bias=False)
    new.load_state_dict(old.state_dict())
    new.fault, new.target = fault, target
    setattr(model.get_submodule(parent), leaf, new)


def _localized(report: object, layer: str, tensor: str) -> None:
    """The fault is named at ``layer``: its first culprit is that unit, or the custom Function the test planted
    the fault with inside it (a smaller unit: ``layer · _FaultyConvFn``), and the unit's row for ``tensor``
    fails."""
    first = report.first_failure
    assert first is not None and first["layer"].split(" · ")[0] == layer, first
    if " · " in first["layer"]:
        assert first["tensor"] == "custom Function <w, J v>"
    assert any(r.layer == layer and r.tensor == tensor for r in report.failures)


def _failing_units(report: object) -> set[str]:
    """Failing units, a custom Function counted as the module it ran in."""
    return {r.layer.split(" · ")[0] for r in report.failures}


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("densenet-bc-10")


def _data(n: int = 2, seed: int = 0, shape: tuple[int, ...] = (3, 16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_correct_model_passes_every_unit_and_json_contract() -> None:
    model = _tiny()
    x, y = _data()
    report = gradcheck_model(model, x, y)
    assert report.verdict == "pass", [r for r in report.rows if r.status != "pass"]
    assert report.first_failure is None
    data = report.to_json()
    assert data["schema"] == SCHEMA and data["verdict"] == "pass" and data["first_failure"] is None
    assert {"layer", "tensor", "error", "tolerance", "status"} <= set(data["rows"][0])
    named = dict(model.named_modules())
    leaves = {n for n, m in named.items() if n and not list(m.children())}
    assert {r.layer for r in report.rows} == leaves  # every op falls in a checked unit
    for r in report.rows:  # every tolerance is derived: small, positive, with its parts
        assert 0 < r.tolerance < 1e-6 and r.error <= r.tolerance
        assert set(r.origin) == {"truncation", "roundoff", "analytic"}
        assert r.resolution is not None and r.resolution < 1e-4


@pytest.mark.parametrize("fault", FAULTS)
def test_planted_input_gradient_fault_is_caught_and_localized(fault: str) -> None:
    model = _tiny()
    _swap_conv(model, "block2.layer01.conv2", fault)
    x, y = _data()
    report = gradcheck_model(model, x, y)
    assert report.verdict == "fail"
    _localized(report, "block2.layer01.conv2", "input0")
    assert _failing_units(report) == {"block2.layer01.conv2"}  # teacher forcing: nobody else


@pytest.mark.parametrize("fault", ["scale:1e-3", "swap"])
def test_planted_weight_gradient_fault_names_the_weight(fault: str) -> None:
    model = _tiny()
    _swap_conv(model, "block1.layer01.conv1", fault, target="weight")
    x, y = _data()
    report = gradcheck_model(model, x, y, layers=["block1.layer01"])
    _localized(report, "block1.layer01.conv1", "weight")
    assert _failing_units(report) == {"block1.layer01.conv1"}


@pytest.mark.parametrize("fault", ["scale:1e-3", "roll", "swap"])
def test_planted_fault_in_a_relu_is_caught_despite_its_kinks(fault: str) -> None:
    model = _tiny()
    model.block3.layer01.relu2 = FaultyReLU()
    model.block3.layer01.relu2.fault = fault
    x, y = _data()
    report = gradcheck_model(model, x, y, layers=["block3.layer01"])
    _localized(report, "block3.layer01.relu2", "input0")


def test_bc100_localizes_a_0p1_percent_fault_in_one_channel_of_a_wide_bn_weight_gradient() -> None:
    """The hard case at scale: 0.1 % on one of 300+ channels of a BN weight gradient deep in BC-100."""
    torch.manual_seed(0)
    model = build_model("densenet-bc-100")
    bn = model.block3.layer16.norm1
    model.block3.layer16.norm1 = Faulty(bn, "weight", "scale:1e-3", channel=100)
    model.block3.layer16.conv2 = Faulty(model.block3.layer16.conv2, "input0", "scale:1e-3", channel=5)
    x, y = _data(shape=(3, 32, 32))
    report = gradcheck_model(model, x, y, layers=["block3.layer16", "block3.cat"])
    failing = {(r.layer, r.tensor) for r in report.failures if " · " not in r.layer}
    assert failing == {("block3.layer16.norm1", "weight"), ("block3.layer16.conv2", "input0")}
    assert _failing_units(report) == {"block3.layer16.norm1", "block3.layer16.conv2"}
    assert bn.weight.shape[0] > 300


def test_unit_at_a_relu_boundary_is_a_kink_not_a_failure() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    x[0, 0] = 0.0  # exactly on the kink: every step crosses it
    x[1, 2, 0, :] = 1e-13  # within any step of it
    rows = gradcheck_unit(nn.ReLU(), [x], [torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)])
    assert [r.status for r in rows] == ["pass"]
    assert rows[0].kinks >= 16 + 4  # the 16 zeros and the 4 near-zeros, masked out and reported


def test_a_relu_entirely_on_its_kink_is_reported_as_kink_not_as_failure() -> None:
    """Central differences across 0 disagree with the backward; the checker says kink, not fail."""
    x = torch.zeros(1, 4, 3, 3, dtype=torch.float64)
    v = torch.ones_like(x)
    u = torch.randn_like(x)
    h = 1e-6
    numeric = ((F.relu(x + h * u) - F.relu(x - h * u)) * v).sum() / (2 * h)
    (analytic,) = torch.autograd.grad(F.relu(x.requires_grad_()), x, v)
    assert abs(float(numeric) - float((analytic * u).sum())) > 0.1
    rows = gradcheck_unit(nn.ReLU(), [x.detach()], [v])
    assert rows[0].status == "kink" and rows[0].kinks == x.numel()


# -- correct units pass over shapes and seeds ----------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 5), o=st.integers(1, 4), hw=st.integers(3, 7), k=st.sampled_from([1, 3]),
       stride=st.integers(1, 2), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_conv_units_pass(n: int, c: int, o: int, hw: int, k: int, stride: int, bias: bool, seed: int) -> None:
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, o, k, stride=stride, padding=k // 2, bias=bias).double()
    x = torch.randn(n, c, hw, hw, dtype=torch.float64)
    gy = torch.randn_like(conv(x))
    rows = gradcheck_unit(conv, [x], [gy], seed=seed)
    assert {r.tensor for r in rows} == {"input0", "weight"} | ({"bias"} if bias else set())
    assert all(r.status == "pass" for r in rows), rows


@settings(max_examples=10, deadline=None)
@given(n=st.integers(2, 4), c=st.integers(1, 4), hw=st.integers(1, 5), train=st.booleans(),
       seed=st.integers(0, 2**16))
def test_batch_norm_units_pass_and_leave_state_alone(n: int, c: int, hw: int, train: bool, seed: int) -> None:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(c).double().train(train)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    before = {k: b.clone() for k, b in bn.named_buffers()}
    x = 1 + 2 * torch.randn(n, c, hw, hw, dtype=torch.float64)
    rows = gradcheck_unit(bn, [x], [torch.randn(n, c, hw, hw, dtype=torch.float64)], seed=seed)
    assert all(r.status == "pass" for r in rows), rows
    assert all(torch.equal(before[k], b) for k, b in bn.named_buffers())  # the check mutated nothing


def test_zero_bias_on_large_outputs_is_still_resolved() -> None:
    """A fresh (zero) bias under eval-mode BN with unnormalized, large activations: the step must scale."""
    bn = nn.BatchNorm2d(6).double().eval()
    x = 1e3 * torch.randn(2, 6, 5, 5, dtype=torch.float64)
    rows = gradcheck_unit(bn, [x], [torch.randn(2, 6, 5, 5, dtype=torch.float64)])
    assert {r.tensor for r in rows} == {"input0", "weight", "bias"}
    assert all(r.status == "pass" and r.resolution < 1e-5 for r in rows), rows


@settings(max_examples=8, deadline=None)
@given(parts=st.lists(st.integers(1, 4), min_size=1, max_size=6), n=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_concat_units_pass(parts: list[int], n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, c, 3, 3, generator=g, dtype=torch.float64) for c in parts]
    gy = torch.randn(n, sum(parts), 3, 3, generator=g, dtype=torch.float64)
    rows = gradcheck_unit(Concat(), xs, [gy], seed=seed)
    assert all(r.status == "pass" for r in rows)
    assert ",".join(r.tensor for r in rows).count("input") == len(parts)


@pytest.mark.parametrize("module", [nn.AvgPool2d(2, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(12, 5),
                                    nn.Tanh(), nn.MaxPool2d(2)])
def test_other_units_pass(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 12, generator=g) if isinstance(module, nn.Linear) else torch.randn(3, 4, 6, 6, generator=g)
    out = module.double()(x.double())
    rows = gradcheck_unit(module, [x.double()], [torch.randn(out.shape, generator=g, dtype=torch.float64)])
    assert all(r.status == "pass" for r in rows), rows


def test_full_mode_compares_whole_jacobians_and_catches_one_wrong_element() -> None:
    torch.manual_seed(0)
    conv = FaultyConv(2, 3, 3, padding=1, bias=False).double()
    conv.fault = "none"
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    gy = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    rows = gradcheck_unit(conv, [x], [gy], mode="full")
    assert [r.mode for r in rows] == ["full", "full"] and all(r.status == "pass" for r in rows)
    assert rows[0].directions == x.numel()

    class OneElement(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):  # noqa: ANN001
            return t * 2

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001
            g = g * 2
            g.view(-1)[5] *= 1 + 1e-6
            return g

    class Doubler(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return OneElement.apply(t)

    rows = gradcheck_unit(Doubler(), [x], [gy], mode="full")
    assert rows[0].status == "fail" and rows[0].mode == "full"


# -- composites: functional ops in a module's own forward ----------------------------------------------------
class _Wrong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):  # noqa: ANN001
        return t * 3

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        return _plant(g * 3, "scale:1e-3", channel=0)


class UserBlock(nn.Module):
    """A user module: a conv child plus its own functional math (relu, a custom op)."""

    def __init__(self, wrong: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.wrong = wrong

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        return _Wrong.apply(h) if self.wrong else h * 3


class UserNet(nn.Module):
    def __init__(self, wrong: bool = False, faulty_conv: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.block = UserBlock(wrong)
        if faulty_conv:
            _swap_conv(self, "block.conv", "scale:1e-2")
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.avg_pool2d(self.block(self.stem(x)), 2), 1))


def test_composite_with_wrong_own_code_is_the_culprit() -> None:
    torch.manual_seed(0)
    x, y = _data(shape=(3, 8, 8))
    report = gradcheck_model(UserNet(wrong=True), x, y)
    layers = {r.layer for r in report.rows}
    assert {"block", "", "block.conv", "stem", "fc"} <= layers  # the composites are units too
    # the wrong code is a custom Function in the block's forward: a unit of its own, inside the block
    assert report.first_failure == {"layer": "block · _Wrong", "tensor": "custom Function <w, J v>"}
    assert not any(r.status == "fail" for r in report.rows if r.layer == "block.conv")
    for layer in ("block", ""):  # the block and the model fail too, explained by the Function
        failing = [r for r in report.failures if r.layer == layer]
        assert failing and not any(r.culprit for r in failing)


class _Doubled(nn.Module):
    """Own code in a composite's forward, no custom Function: only the composite's row can name it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return h + h.detach()  # the value of 2h, the gradient of h: wrong own code, every dtype


def test_composite_with_wrong_own_aten_code_is_the_culprit() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), _Doubled(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    report = gradcheck_model(model, *_data(shape=(3, 8, 8)))
    assert report.first_failure is not None and report.first_failure["layer"] == "1"
    assert not any(r.status == "fail" for r in report.rows if r.layer == "1.conv")


def test_failing_child_explains_its_composite() -> None:
    torch.manual_seed(0)
    x, y = _data(shape=(3, 8, 8))
    report = gradcheck_model(UserNet(faulty_conv=True), x, y)
    _localized(report, "block.conv", "input0")
    assert all(not r.culprit for r in report.failures if r.layer in ("block", ""))


# -- modes and model variants --------------------------------------------------------------------------------
def test_faulty_wrapper_is_itself_exact_when_no_fault_is_planted() -> None:
    """The test's own fault injector must not be the thing that fails."""
    torch.manual_seed(0)
    model = _tiny()
    model.trans1.norm = Faulty(model.trans1.norm, "weight", "none")
    x, y = _data()
    assert gradcheck_model(model, x, y, layers=["trans1"]).verdict == "pass"
    model.trans1.norm.fault = "scale:1e-3"
    report = gradcheck_model(model, x, y, layers=["trans1"])
    _localized(report, "trans1.norm", "weight")


@pytest.mark.gpu
def test_cuda_fp64_units_pass_and_a_planted_fault_is_caught() -> None:
    model = _tiny().cuda()
    x, y = _data()
    assert gradcheck_model(model, x.cuda(), y.cuda()).verdict == "pass"
    _swap_conv(model, "block2.layer01.conv2", "scale:1e-3")
    report = gradcheck_model(model.cuda(), x.cuda(), y.cuda())
    _localized(report, "block2.layer01.conv2", "input0")


@pytest.mark.parametrize("kwargs", [{"drop_rate": 0.2}, {"memory_efficient": True}])
def test_model_variants_pass(kwargs: dict) -> None:
    torch.manual_seed(0)
    model = build_model("densenet-bc-10", **kwargs)
    x, y = _data()
    rng = torch.get_rng_state()
    report = gradcheck_model(model, x, y, layers=["block1", "trans1"])
    assert report.verdict == "pass", [r for r in report.rows if r.status != "pass"]
    assert torch.equal(rng, torch.get_rng_state())  # dropout masks came from a private seed


def test_eval_mode_and_unknown_layer() -> None:
    model = _tiny()
    x, y = _data()
    assert gradcheck_model(model, x, y, eval_mode=True, layers=["trans2"]).verdict == "pass"
    from densenet_debug.errors import UsageError

    with pytest.raises(UsageError, match="--list"):
        gradcheck_model(model, x, y, layers=["block9"])
    with pytest.raises(UsageError, match="mode"):
        gradcheck_model(model, x, y, mode="slow")


def test_model_parameters_and_buffers_are_untouched() -> None:
    model = _tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    gradcheck_model(model, x, y, layers=["block1.layer01"])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
