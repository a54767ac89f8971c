"""The verdict engine: planted wrong backwards are localised, correct backends agree, modes make faults visible."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from densenet_debug import build_model
from densenet_debug.backends import parse_backend
from densenet_debug.errors import UsageError
from densenet_debug.verdict.engine import diff, judge, local_check, oracle_traces


def _batch(n: int, seed: int = 0, size: int = 32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _model(name: str = "densenet-bc-10", seed: int = 0, **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, **kw)


def _swap(model: nn.Module, name: str, cls: type) -> nn.Module:
    """Re-class one unit in place (same parameters, same name): a test-local faulty kernel."""
    unit = dict(model.named_modules())[name]
    unit.__class__ = cls
    return model


# -- test-local faulty kernels --------------------------------------------------------------------------
class _GradFn(torch.autograd.Function):
    """Identity whose backward applies ``fn`` to the incoming gradient."""

    @staticmethod
    def forward(ctx, t: Tensor, fn) -> Tensor:  # noqa: ANN001
        ctx.fn = fn
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple:
        return ctx.fn(g), None


class NativeOnlyWrongConv(nn.Conv2d):
    """Wrong weight gradient (x1.5) only with oneDNN off, in fp32: the fault of one backend."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if x.dtype == torch.float32 and not torch.backends.mkldnn.enabled:
            w = _GradFn.apply(w, lambda g: 1.5 * g)
        return self._conv_forward(x, w, self.bias)


def _as_contiguous(g: Tensor) -> Tensor:
    if g.is_contiguous():
        return g
    return g.as_strided(g.shape, torch.empty(g.shape, device="meta").stride(), g.storage_offset())


class LayoutFaultConv(nn.Conv2d):
    """#708: in fp32 the backward walks a non-contiguous grad_output with contiguous strides from its offset."""

    def forward(self, x: Tensor) -> Tensor:
        out = self._conv_forward(x, self.weight, self.bias)
        return _GradFn.apply(out, _as_contiguous) if x.dtype == torch.float32 else out


class StaleWeightConv(nn.Conv2d):
    """In fp32 it keeps using the weight it first saw (a cache keyed on the parameter, not its version)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float64:
            return super().forward(x)
        if not hasattr(self, "_cached"):
            self._cached = self.weight.detach().clone()
        w = self.weight + (self._cached - self.weight).detach()  # stale value, live gradient
        return self._conv_forward(x, w, self.bias)


class EvalBackwardBN(nn.BatchNorm2d):
    """In eval mode and fp32 the input gradient is scaled by 2 (a wrong eval-mode backward formula)."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        if not self.training and x.dtype == torch.float32:
            out = _GradFn.apply(out, lambda g: 2 * g)
        return out


class MomentumBN(nn.BatchNorm2d):
    """In fp32 the running statistics move with twice the momentum."""

    def forward(self, x: Tensor) -> Tensor:
        momentum = self.momentum
        if x.dtype == torch.float32:
            self.momentum = 2 * momentum
        try:
            return super().forward(x)
        finally:
            self.momentum = momentum


# -- tests ------------------------------------------------------------------------------------------------
def test_wrong_backward_under_one_backend_is_localised_to_its_layer_and_pass() -> None:
    model = _swap(_model(), "block2.layer01.conv2", NativeOnlyWrongConv)
    x, y = _batch(3)
    report = diff(model, x, y, "mkldnn", "native")
    assert report.verdict == "mismatch"
    first = report.first_divergence
    assert (first["layer"], first["pass"], first["quantity"], first["side"], first["mode"]) == (
        "block2.layer01.conv2", "backward", "grad_weight", "b", "local")
    local_failures = {(r.layer, r.quantity) for r in report.rows if r.mode == "local" and r.status == "mismatch"}
    assert local_failures == {("block2.layer01.conv2", "grad_weight")}
    swapped = diff(model, x, y, "native", "mkldnn")
    assert swapped.first_divergence["side"] == "a"


def test_identical_backends_agree() -> None:
    x, y = _batch(2)
    report = diff(_model(), x, y, "native", "native")
    assert report.verdict == "agree" and report.first_divergence is None
    assert all(r.error_a == r.error_b for r in report.rows if r.mode == "local")


@given(name=st.sampled_from(["densenet-bc-10", "densenet-bc-16"]), n=st.integers(1, 5), seed=st.integers(0, 10**4),
       pair=st.sampled_from([("mkldnn", "native"), ("channels_last", "native"), ("mkldnn", "fp64"),
                             ("bf16", "native"), ("channels_last+bf16", "mkldnn")]))
@settings(max_examples=8, deadline=None)
def test_correct_backends_never_mismatch(name: str, n: int, seed: int, pair: tuple[str, str]) -> None:
    x, y = _batch(n, seed, size=16)
    report = diff(_model(name, seed), x, y, *pair)
    assert report.verdict == "agree", report.summary


class ConvTwice(nn.Module):
    """A conv and a batch norm each called twice in one forward, in the functional style: .grad sums both calls."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn(self.conv0(x)))
        b = F.relu(self.bn(self.conv1(a)))
        c = F.relu(self.conv1(b))
        return self.fc(F.adaptive_avg_pool2d(torch.cat([b, c], 1), 1).flatten(1))


@given(n=st.integers(2, 5), seed=st.integers(0, 10**4), pair=st.sampled_from([("mkldnn", "native"),
                                                                              ("channels_last", "fp64")]))
@settings(max_examples=5, deadline=None)
def test_modules_called_twice_agree(n: int, seed: int, pair: tuple[str, str]) -> None:
    """Local rows judge the first call's share of each parameter gradient (its replay computes that share);
    the whole .grad was judged against it before, and every correct backend failed conv1's grad_bias."""
    x, y = _batch(n, seed, size=8)
    torch.manual_seed(seed)
    report = diff(ConvTwice(), x, y, *pair)
    assert report.verdict == "agree", report.summary
    assert {"grad_weight", "grad_bias"} <= {r.quantity for r in report.rows if r.layer == "conv1" and r.mode == "local"}


def test_a_fault_in_a_module_called_twice_is_localised_to_it() -> None:
    x, y = _batch(3, size=8)
    torch.manual_seed(0)
    report = diff(ConvTwice(), x, y, "mkldnn", "native+fault:bn_invstd_as_var@bn")
    assert report.verdict == "mismatch"
    first = report.first_divergence
    assert (first["layer"], first["pass"], first["side"], first["mode"]) == ("bn", "backward", "b", "local")


def test_layout_fault_is_caught_by_the_local_check_at_its_unit() -> None:
    """conv2 of a block's last layer gets a cat-backward slice as grad_output: offset and non-contiguous."""
    unit = "block1.layer02.conv2"
    x, y = _batch(3)
    model = _swap(_model("densenet-bc-16"), unit, LayoutFaultConv)
    report = diff(model, x, y, "native", "fp64")
    local = [r for r in report.rows if r.mode == "local" and r.status == "mismatch"]
    assert {r.layer for r in local} == {unit} and {r.pass_ for r in local} == {"backward"}
    assert report.first_divergence["layer"] == unit
    x1, y1 = _batch(1)  # a batch of one: the slice is contiguous in all but name, the fault is invisible
    assert diff(_swap(_model("densenet-bc-16"), unit, LayoutFaultConv), x1, y1, "native", "fp64").verdict == "agree"


def test_stale_weight_cache_shows_only_from_the_second_step() -> None:
    x, y = _batch(2)
    model = _swap(_model(), "block1.layer01.conv1", StaleWeightConv)
    assert diff(model, x, y, "native", "fp64", steps=1).verdict == "agree"
    report = diff(model, x, y, "native", "fp64", steps=2)
    assert report.verdict == "mismatch"
    assert (report.first_divergence["layer"], report.first_divergence["step"]) == ("block1.layer01.conv1", 1)


def test_eval_mode_backward_fault_needs_eval_mode() -> None:
    x, y = _batch(2)
    model = _swap(_model(), "block2.layer01.norm1", EvalBackwardBN)
    assert diff(model, x, y, "native", "fp64").verdict == "agree"
    report = diff(model, x, y, "native", "fp64", eval_mode=True)
    assert (report.first_divergence["layer"], report.first_divergence["pass"]) == ("block2.layer01.norm1",
                                                                                  "backward")


def test_running_buffers_are_compared() -> None:
    x, y = _batch(2)
    report = diff(_swap(_model(), "trans1.norm", MomentumBN), x, y, "native", "fp64")
    assert (report.first_divergence["layer"], report.first_divergence["quantity"]) == ("trans1.norm", "running_mean")


class BackwardStatBN(nn.BatchNorm2d):
    """In fp32, its running mean is halved during the backward (a recompute touching the stats): no unit's
    outputs or gradients change, only the state the next step starts from."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        if self.training and x.dtype == torch.float32 and out.requires_grad:
            out.register_hook(self._halve)
        return out

    def _halve(self, grad: Tensor) -> None:
        self.running_mean.data.mul_(0.5)


def test_state_touched_between_steps_is_caught() -> None:
    x, y = _batch(2)
    model = _swap(_model(), "block2.layer01.norm2", BackwardStatBN)
    assert diff(model, x, y, "native", "fp64").verdict == "agree"
    report = diff(model, x, y, "native", "fp64", steps=2)
    first = report.first_divergence
    assert (first["layer"], first["quantity"], first["step"], first["side"]) == (
        "block2.layer01.norm2", "running_mean (carried)", 1, "a")


def test_a_fault_invisible_to_every_unit_is_caught_by_the_propagated_comparison() -> None:
    """Checkpointed layers on detached inputs: every unit is right, the wiring is not."""
    x, y = _batch(2)
    model = _model(memory_efficient=True)
    report = diff(model, x, y, "native", "native+fault:checkpoint_detached_inputs@block2.layer01")
    assert report.verdict == "mismatch"
    assert not [r for r in report.rows if r.mode == "local" and r.status == "mismatch"]
    assert report.first_divergence["mode"] == "propagated" and report.first_divergence["side"] == "b"


class _Composite(nn.Module):
    """A user block whose own forward does functional math (scale + residual): a non-leaf unit."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv(x))
        if h.dtype == torch.float32:  # the functional part is wrong in fp32
            h = _GradFn.apply(h, lambda g: -g)
        return h + x


class _WrongChildComposite(_Composite):
    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + x


class NativeOnlyWrongInputGradConv(nn.Conv2d):
    """Wrong input gradient (x1.5) only with oneDNN off, in fp32."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and not torch.backends.mkldnn.enabled:
            x = _GradFn.apply(x, lambda g: 1.5 * g)
        return self._conv_forward(x, self.weight, self.bias)


def test_a_failing_composite_whose_children_pass_is_the_culprit() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _Composite(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    x, y = torch.randn(2, 3, 6, 6), torch.tensor([1, 3])
    report = diff(model, x, y, "native", "fp64")
    assert report.first_divergence["layer"] == "1" and report.first_divergence["mode"] == "local"
    assert all(r.status == "ok" for r in report.rows if r.mode == "local" and r.layer == "1.conv")


def test_a_failing_child_is_blamed_before_its_composite() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _WrongChildComposite(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5))
    model[1].conv.__class__ = NativeOnlyWrongInputGradConv
    x, y = torch.randn(2, 3, 6, 6), torch.tensor([1, 3])
    report = diff(model, x, y, "mkldnn", "native")
    assert report.first_divergence["layer"] == "1.conv"
    composite = [r for r in report.rows if r.layer == "1" and r.mode == "local" and r.status == "mismatch"]
    assert composite and all(r.note.startswith("explained by failing unit 1.conv") for r in composite)


@pytest.mark.gpu
def test_cudnn_against_native_cuda_kernels_agrees() -> None:
    x, y = _batch(4)
    report = diff(_model("densenet-bc-16"), x, y)  # the defaults with CUDA: cudnn vs no-cudnn
    assert (report.a, report.b) == ("cudnn", "no-cudnn")
    assert report.verdict == "agree", report.summary
    assert report.environment["flags_a"]["cudnn.enabled"] is True
    assert report.environment["flags_b"]["cudnn.enabled"] is False


@pytest.mark.gpu
@pytest.mark.parametrize("a", ["cudnn-benchmark", "cudnn-deterministic", "cudnn+channels_last", "tf32", "bf16",
                               "fp16"])
def test_cuda_backends_agree_with_their_own_precision(a: str) -> None:
    x, y = _batch(4)
    report = diff(_model("densenet-bc-16"), x, y, a, "no-cudnn", device="cuda")
    assert report.verdict == "agree", report.summary


class FirstCallWrongConv(nn.Conv2d):
    """In fp32, wrong (x1.1) on its first call only: a state fault teacher forcing (a later call) cannot see."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        if x.dtype == torch.float32 and not getattr(self, "_called", False):
            self._called = True
            return out * 1.1
        return out


def test_a_fault_only_in_the_real_run_is_caught_by_the_self_consistency_of_the_propagated_rows() -> None:
    x, y = _batch(2)
    report = diff(_swap(_model(), "block2.layer01.conv1", FirstCallWrongConv), x, y, "native", "fp64")
    assert report.verdict == "mismatch"
    assert not [r for r in report.rows if r.mode == "local" and r.status == "mismatch"]
    first = report.first_divergence
    assert (first["layer"], first["pass"], first["mode"], first["side"]) == ("block2.layer01.conv1", "forward",
                                                                           "propagated", "a")


def test_amplified_precision_error_is_not_a_mismatch() -> None:
    """TF32-rounded operands at one conv (judged with TF32's roundoff there) pass through train-mode BN at batch 1:
    large propagated gradient errors downstream, every unit right at its own inputs."""
    x, y = _batch(1, 2, size=16)
    report = diff(_model("densenet-bc-10", 2), x, y, "native+fault:tf32_round@block2.layer01.conv1", "native")
    assert report.verdict == "agree", report.summary
    amplified = [r for r in report.rows if r.note.startswith("amplified upstream error")]
    assert amplified and all(r.status == "ok" and r.mode == "propagated" for r in amplified)
    assert all(r.error_a > r.tolerance for r in amplified)  # above the first-order sum, yet no fault


def test_needs_of_a_planted_fault_raise_the_steps() -> None:
    x, y = _batch(2)
    report = diff(_model(), x, y, "native", "native+fault:stale_grad_accumulate@block1.layer01.conv1")
    assert report.settings["steps"] == 2 and report.verdict == "mismatch"


def test_judge_needs_only_the_oracle_traces_and_local_check_is_one_sided() -> None:
    x, y = _batch(2)
    model = _model()
    oracle = oracle_traces(model, x, y, steps=2)
    side = judge(model, x, y, parse_backend("mkldnn"), oracle, steps=2)
    assert {r.step for r in side.rows} == {0, 1} and not side.failures
    rows = local_check(_swap(_model(), "block1.layer01.conv2", NativeOnlyWrongConv), x, y, "native")
    assert {r.mode for r in rows} == {"local", "function"}  # the fault's Function, applied on this side only:
    assert all("applied on this side only" in r.note for r in rows if r.mode == "function")  # a note row
    assert [(r.layer, r.quantity) for r in rows if r.status == "mismatch"] == [("block1.layer01.conv2",
                                                                                "grad_weight")]


def test_bad_arguments_are_usage_errors() -> None:
    x, y = _batch(2)
    with pytest.raises(UsageError):
        diff(_model(), x, y, "native", "mkldnn", fail_on="sometimes")
    with pytest.raises(UsageError):
        diff(_model(), x, y[:1], "native", "mkldnn")
    with pytest.raises(UsageError):
        oracle_traces(_model(), x, y, steps=0)


@pytest.mark.slow
def test_bc100_onednn_against_native_agrees_and_explains_its_kinks() -> None:
    x, y = _batch(8)
    report = diff(_model("densenet-bc-100"), x, y, "mkldnn", "native")
    assert report.verdict == "agree", report.summary
    assert all(r.status == "ok" for r in report.rows if r.mode == "local")
    assert report.kinks and any(r.status == "kink" for r in report.rows)
