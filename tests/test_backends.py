"""Backends: parsing, flags set and restored in full, model/input conversion, the fault hook."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from densenet_debug.backends import Backend, parse_backend, unit_roundoff
from densenet_debug.errors import UsageError


@pytest.mark.parametrize("spec, message", [
    ("bogus", "unknown backend 'bogus'; valid: native, mkldnn"),
    ("native+", "empty component"),
    ("native+mkldnn", "conflicts"),
    ("fp64+bf16", "cannot be combined"),
    ("", "empty backend name"),
])
def test_bad_specs_raise_one_line_usage_errors(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_backend(spec)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
@pytest.mark.parametrize("spec", ["cudnn", "no-cudnn", "tf32", "fp16", "cudnn-benchmark+channels_last"])
def test_cuda_backends_without_cuda_say_so(spec: str) -> None:
    with pytest.raises(UsageError, match="CUDA"):
        parse_backend(spec)


def test_cpu_backend_on_a_cuda_device_is_refused() -> None:
    with pytest.raises(UsageError):
        parse_backend("native", "cuda" if torch.cuda.is_available() else "cuda:0")


def test_active_sets_every_flag_and_restores_them_even_on_error() -> None:
    before = (torch.backends.mkldnn.enabled, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
              torch.backends.cuda.matmul.allow_tf32, torch._C._get_nnpack_enabled())
    native = parse_backend("native")
    with native.active():
        assert torch.backends.mkldnn.enabled is False
        assert native.flags_in_force()["mkldnn.enabled"] is False
        assert native.flags_in_force()["nnpack.enabled"] is False
    assert torch.backends.mkldnn.enabled == before[0]
    with pytest.raises(RuntimeError), parse_backend("mkldnn").active():
        assert torch.backends.mkldnn.enabled is True
        raise RuntimeError("boom")
    after = (torch.backends.mkldnn.enabled, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32, torch._C._get_nnpack_enabled())
    assert after == before


@pytest.mark.skipif(not torch.backends.nnpack.is_available(), reason="this torch build has no NNPACK")
def test_native_at_a_training_batch_is_the_direct_convolution_not_nnpack() -> None:
    """At batch >= 16 torch would pick NNPACK's Winograd for this conv with oneDNN off; native must not.

    Direct summation errs by a few u·Σ|terms| (the conv bound allows C·k·k of them); Winograd's transforms
    err by tens of them on the same data, so the measured error tells which algorithm ran.
    """
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 24, 16, 16, generator=gen), torch.randn(12, 24, 3, 3, generator=gen)
    truth = nn.functional.conv2d(x.double(), w.double(), padding=1)
    terms = nn.functional.conv2d(x.double().abs(), w.double().abs(), padding=1)

    def error_in_u() -> float:
        y = nn.functional.conv2d(x, w, padding=1)
        return float(((y.double() - truth).abs() / terms).max()) / unit_roundoff(torch.float32)

    with parse_backend("native").active():
        direct = error_in_u()
    with torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=True):
        winograd = error_in_u()
    assert direct < 8.0 < winograd  # 8: twice the direct kernel's worst measured here (3.9)


def test_prepare_model_converts_a_deep_copy(tiny_model) -> None:
    model = tiny_model()
    first = next(model.parameters()).detach().clone()
    b = parse_backend("fp64+channels_last")
    prepared = b.prepare_model(model)
    assert prepared is not model
    assert all(p.dtype == torch.float64 for p in prepared.parameters())
    assert prepared.stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(next(model.parameters()), first) and next(model.parameters()).dtype == torch.float32
    x = b.prepare_input(torch.randn(2, 3, 8, 8))
    assert x.dtype == torch.float64 and x.is_contiguous(memory_format=torch.channels_last)
    assert b.unit_roundoff == 2.0**-53


def test_bf16_autocasts_convolutions_inside_active() -> None:
    b = parse_backend("bf16")
    assert b.dtype == torch.bfloat16 and b.param_dtype == torch.float32 and b.unit_roundoff == 2.0**-8
    conv = b.prepare_model(nn.Conv2d(3, 4, 3))
    with b.active():
        assert conv(b.prepare_input(torch.randn(1, 3, 5, 5))).dtype == torch.bfloat16
    assert conv(torch.randn(1, 3, 5, 5)).dtype == torch.float32


def test_unit_roundoffs() -> None:
    assert unit_roundoff(torch.float32) == 2.0**-24
    assert unit_roundoff(torch.float16) == 2.0**-11
    assert unit_roundoff(torch.int64) == 0.0


class _Doubler:
    """A test-local fault: the contract parse_backend expects from densenet_debug.faults.registry."""

    name, control, layer = "doubler", False, "1"
    needs = {"steps": 2}

    def __init__(self) -> None:
        self.applied_to: nn.Module | None = None

    def apply(self, model: nn.Module) -> None:
        self.applied_to = model
        unit = dict(model.named_modules())[self.layer]
        unit.forward = lambda x, _f=unit.forward: 2 * _f(x)


def test_faults_are_applied_last_on_the_prepared_copy_and_their_needs_are_merged() -> None:
    fault = _Doubler()
    b = parse_backend("native")
    b.faults.append(fault)
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    prepared = b.prepare_model(model)
    assert fault.applied_to is prepared
    x = torch.randn(2, 3)
    assert torch.allclose(prepared(x), 2 * model(x))
    assert b.needs == {"steps": 2}


def test_fault_components_resolve_through_the_registry() -> None:
    b = parse_backend("native+fault:cat_backward_slice_offset@block1.cat")
    assert isinstance(b, Backend) and b.faults and b.faults[0].name == "cat_backward_slice_offset"


def test_compiled_units_really_compile_and_agree_with_eager() -> None:
    """Every unit compiled separately (aot_eager keeps this quick); the report shows graphs were compiled."""
    from densenet_debug.verdict.engine import diff

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 5))
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 2, 3])
    with pytest.raises(UsageError, match="unknown torch.compile backend"):
        parse_backend("compile:no_such_backend")
    report = diff(model, x, y, "compile:aot_eager", "native")
    assert report.verdict == "agree", report.summary
    assert report.environment["flags_a"]["compile"] == "aot_eager"
    assert report.environment["flags_a"]["compiled_graphs"] >= 4
