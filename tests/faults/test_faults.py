"""Each planted fault, against the clean model in fp64: it changes what it should, and nothing else."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from densenet_debug import build_model
from densenet_debug.backends import TF32_ROUNDOFF
from densenet_debug.errors import UsageError
from densenet_debug.faults.ops import FaultConfig, _padded_pool_grad, round_mantissa
from densenet_debug.faults.registry import (
    BUGS,
    CONTROLS,
    FAULTS,
    eligible_units,
    make_fault,
    planted,
)
from densenet_debug.models import DenseNet
from densenet_debug.trace import trace_step


def _model(seed: int = 0, name: str = "densenet-bc-16", padded_pools: bool = False, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(name, **kw).double()
    if padded_pools:  # 3x3/2 pad 1 keeps every shape of the 2x2/2 pool
        for parent in list(model.modules()):
            for child, m in list(parent.named_children()):
                if isinstance(m, nn.AvgPool2d):
                    setattr(parent, child, nn.AvgPool2d(3, 2, padding=1))
    return model


def _batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def _run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 1) -> tuple:
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        out = model(x)
        F.cross_entropy(out, y).backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), grads, {n: b.clone() for n, b in model.named_buffers()}


def _same(a: torch.Tensor | None, b: torch.Tensor | None, rtol: float = 1e-12) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.allclose(a.double(), b.double(), rtol=rtol, atol=rtol * float(b.abs().max().double()) + 1e-300)


def _planted_pair(name: str, seed: int = 0, layer: str | None = None, **model_kw) -> tuple:
    fault = make_fault(f"{name}@{layer}" if layer else name, seed=seed)
    kw = dict(model_kw)
    if fault.needs.get("memory_efficient"):
        kw["memory_efficient"] = True
    clean = _model(seed, padded_pools=bool(fault.needs.get("pool_padding")), **kw)
    faulty = copy.deepcopy(clean)
    fault.apply(faulty)
    return fault, clean, faulty


# What each fault must change (and so what must stay bit-for-bit the same), under the modes it needs.
CHANGES = {
    "strided_read_as_contiguous": {"grads"},
    "cat_backward_slice_offset": {"grads"},
    "cat_forward_permuted": {"output", "grads", "buffers"},
    "stale_grad_accumulate": {"grads"},
    "bn_eval_backward_uses_batch_stats": {"grads"},
    "bn_invstd_as_var": {"grads"},
    "bn_layout_mislabel": {"grads"},
    "partial_channel_tile": {"grads"},
    "pool_pad_offset": {"grads"},
    "bn_unbiased_normalisation": {"output", "grads", "buffers"},
    "bn_double_stat_update": {"buffers"},
    "checkpoint_detached_inputs": {"grads"},
}


def test_registry_covers_the_catalog_faults_and_controls():
    assert set(CHANGES) == set(BUGS)
    assert set(CONTROLS) == {"tf32_round", "reordered_sum"}
    for spec in FAULTS.values():
        assert spec.passes in ("forward", "backward")


@pytest.mark.parametrize("name", BUGS)
def test_fault_changes_what_it_should_and_nothing_else(name):
    fault, clean, faulty = _planted_pair(name)
    assert planted(faulty) == {u: name for u in fault.units} and fault.layer == fault.units[0]
    assert not planted(clean)
    x, y = _batch(4)
    if fault.needs.get("eval"):
        clean.eval(), faulty.eval()
    steps = fault.needs.get("steps", 1)
    out_c, grads_c, bufs_c = _run(clean, x, y, steps)
    out_f, grads_f, bufs_f = _run(faulty, x, y, steps)
    changed = {
        "output": not _same(out_f, out_c),
        "grads": any(not _same(grads_f[n], grads_c[n]) for n in grads_c),
        "buffers": any(not _same(bufs_f[n], bufs_c[n]) for n in bufs_c),
    }
    assert {k for k, v in changed.items() if v} == CHANGES[name]


@pytest.mark.parametrize("name", [n for n in BUGS if FAULTS[n].needs.keys() & {"steps", "eval", "pool_padding"}])
def test_mode_dependent_fault_is_invisible_without_its_mode(name):
    fault, clean, faulty = _planted_pair(name)
    if fault.needs.get("pool_padding"):  # the same fault on the model's own pad-0 pools
        clean = _model(0)
        fault, faulty = make_fault(f"{name}@trans1.pool"), copy.deepcopy(clean)
        fault.apply(faulty)
    x, y = _batch(4)
    for a, b in zip(_run(clean, x, y), _run(faulty, x, y)):
        if isinstance(a, dict):
            assert all(_same(a[n], b[n]) for n in a)
        else:
            assert _same(a, b)


@pytest.mark.parametrize("name", BUGS)
def test_fault_leaves_everything_before_it_untouched(name):
    """Localisation rests on this: the planted unit is the first whose local behaviour changes."""
    fault, clean, faulty = _planted_pair(name)
    if fault.needs.get("eval"):
        clean.eval(), faulty.eval()
    x, y = _batch(4)
    for _ in range(fault.needs.get("steps", 1) - 1):
        _run(faulty, x, y)
        _run(clean, x, y)
    tc, tf = trace_step(clean, x, y), trace_step(faulty, x, y)
    unit = fault.units[0]
    if unit not in tc:  # a composite (the checkpointed layer): its first unit
        unit = next(n for n in tc.forward_order if n.startswith(f"{unit}."))
    for n in tc.forward_order[: tc[unit].forward_index]:
        assert all(_same(a, b) for a, b in zip(tf[n].outputs, tc[n].outputs)), n
    if fault.passes == "backward" and name != "checkpoint_detached_inputs":
        assert all(_same(a, b) for a, b in zip(tf[unit].outputs, tc[unit].outputs))
        for n in tc.backward_order[: tc[unit].backward_index + 1]:
            assert all(_same(a, b) for a, b in zip(tf[n].grad_outputs, tc[n].grad_outputs)), n


def _trace_unit_grads(model: nn.Module, unit: str, x: torch.Tensor, y: torch.Tensor) -> tuple:
    trace = trace_step(model, x, y, units=[unit])
    return trace[unit].grad_inputs[0], trace[unit].param_grads["weight"], trace[unit].grad_output_layouts[0]


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 5), block=st.integers(0, 2))
def test_708_sample_zero_right_later_samples_wrong(seed, n, block):
    """#708's signature at the planted conv: grad_input of sample 0 exact, of every later sample wrong."""
    clean = _model(seed)
    unit = eligible_units("strided_read_as_contiguous", clean)[block]
    faulty = copy.deepcopy(clean)
    make_fault(f"strided_read_as_contiguous@{unit}").apply(faulty)
    x, y = _batch(n, seed)
    gx_c, gw_c, layout = _trace_unit_grads(clean, unit, x, y)
    gx_f, gw_f, _ = _trace_unit_grads(faulty, unit, x, y)
    assert not layout.is_contiguous and layout.storage_offset > 0  # the cat-backward slice it needs
    assert _same(gx_f[0], gx_c[0])
    for i in range(1, n):
        assert (gx_f[i] - gx_c[i]).norm() > 1e-3 * gx_c[i].norm()
    assert not _same(gw_f, gw_c)


def test_708_invisible_at_batch_one():
    fault, clean, faulty = _planted_pair("strided_read_as_contiguous", layer="*")
    assert len(fault.units) == 3
    x, y = _batch(1)
    _, grads_c, _ = _run(clean, x, y)
    _, grads_f, _ = _run(faulty, x, y)
    assert all(_same(grads_f[n], grads_c[n]) for n in grads_c)


@pytest.mark.parametrize("config", [dict(name="densenet-bc-16"), dict(name="densenet-bc-10"),
                                    dict(depth=10, growth_rate=4, bottleneck=False)])
def test_708_eligibility_matches_the_traced_layouts(config):
    """The structural rule (last layer's last conv of each block) is exactly where cat slices arrive."""
    torch.manual_seed(0)
    model = build_model(config["name"]) if "name" in config else DenseNet(**config)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    trace = trace_step(model, x, y, record=("grad_outputs",))
    sliced = {r.name for r in trace if r.kind == "Conv2d" and r.grad_output_layouts
              and not r.grad_output_layouts[0].is_contiguous}
    assert set(eligible_units("strided_read_as_contiguous", model)) == sliced and len(sliced) == 3


def test_stale_state_is_per_model_copy():
    fault, clean, faulty = _planted_pair("stale_grad_accumulate")
    x, y = _batch(2)
    _run(faulty, x, y)
    twin = copy.deepcopy(faulty)  # carries the first call's buffer, independently
    fresh = copy.deepcopy(clean)
    make_fault(f"stale_grad_accumulate@{fault.layer}").apply(fresh)
    g_twin, g_faulty, g_fresh = _run(twin, x, y)[1], _run(faulty, x, y)[1], _run(fresh, x, y)[1]
    g_clean = _run(clean, x, y)[1]
    assert all(_same(g_twin[n], g_faulty[n]) for n in g_clean)
    assert all(_same(g_fresh[n], g_clean[n]) for n in g_clean)
    weight = f"{fault.layer}.weight"
    assert _same(g_faulty[weight], 2 * g_clean[weight])


def test_checkpoint_fault_starves_the_bottleneck():
    fault, clean, faulty = _planted_pair("checkpoint_detached_inputs")
    x, y = _batch(2)
    grads_c, grads_f = _run(clean, x, y)[1], _run(faulty, x, y)[1]
    front = [n for n in grads_c if n.startswith(f"{fault.layer}.") and n.split(".")[-2] in ("norm1", "conv1")]
    assert front and all(grads_f[n] is None and grads_c[n] is not None for n in front)


@pytest.mark.parametrize("name", CONTROLS)
def test_controls_stay_within_their_precision(name):
    fault, clean, faulty = _planted_pair(name, layer="*")
    x, y = _batch(4)
    out_c, grads_c, _ = _run(clean, x, y)
    with fault.kernel():  # a control is a kernel: what Backend.active() enters for its side
        out_f, grads_f, _ = _run(faulty, x, y)
    rel = float((out_f - out_c).norm() / out_c.norm())
    if name == "reordered_sum":
        assert 0 < rel < 1e-13 or rel == 0
        assert all(_same(grads_f[n], grads_c[n], rtol=1e-10) for n in grads_c)
    else:  # tf32: clearly rounded, but at TF32's own unit roundoff, not a blunder
        assert 1e-6 < rel < 1e3 * TF32_ROUNDOFF


def test_round_mantissa_is_round_to_nearest_with_ten_bits():
    x = torch.randn(10000, dtype=torch.float64) * 10 ** torch.randint(-8, 8, (10000,)).double()
    r = round_mantissa(x)
    mantissa, _ = torch.frexp(r)
    assert torch.equal(mantissa * 2**11, torch.round(mantissa * 2**11))  # 11 significant bits
    assert float(((r - x).abs() / x.abs()).max()) <= TF32_ROUNDOFF
    x32 = x.float()
    bits = x32.view(torch.int32)  # reference: round-half-even on the 13 dropped bits of fp32
    ref = ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)
    assert torch.equal(round_mantissa(x32), ref)
    assert torch.equal(round_mantissa(x.half()), x.half())


@settings(max_examples=8, deadline=None)
@given(k=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 2), include=st.booleans(), size=st.integers(5, 9))
def test_padded_pool_gradient_matches_torch(k, s, p, include, size):
    """The pool fault's correct slice is torch's gradient: the fault differs by the offset alone."""
    p = min(p, k // 2)
    pool = nn.AvgPool2d(k, s, p, count_include_pad=include)
    x = torch.randn(2, 3, size, size + 1, dtype=torch.float64, requires_grad=True)
    out = pool(x)
    go = torch.randn_like(out)
    (ref,) = torch.autograd.grad(out, x, go)
    grad = _padded_pool_grad(pool, go, x.shape)
    assert torch.allclose(grad[:, :, p:p + size, p:p + size + 1], ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_bn_function_without_fault_is_the_stock_op(train, affine):
    from densenet_debug.faults.ops import bn_backward_fault_forward
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5, affine=affine).double()
    bn.running_var.uniform_(0.5, 2)
    twin = copy.deepcopy(bn)
    twin._fault = FaultConfig("none", 1.0)
    bn.train(train), twin.train(train)
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    go = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    params = [x, *bn.parameters()]
    ref = torch.autograd.grad(bn(x), params, go)
    got = torch.autograd.grad(bn_backward_fault_forward(twin, x), [x, *twin.parameters()], go)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-13) for a, b in zip(got, ref))
    assert all(torch.equal(a, b) for a, b in zip(bn.buffers(), twin.buffers()))


def test_make_fault_parses_and_rejects():
    f = make_fault("bn_unbiased_normalisation@block1.layer02.norm1=0.5")
    assert (f.name, f.layer, f.mag, f.control) == ("bn_unbiased_normalisation", "block1.layer02.norm1", 0.5, False)
    assert make_fault("tf32_round").control and make_fault("stale_grad_accumulate").needs == {"steps": 2}
    for bad in ["nope", "cat_forward_permuted=2", "partial_channel_tile=-1", "partial_channel_tile=x",
                "partial_channel_tile=nan"]:
        with pytest.raises(UsageError):
            make_fault(bad)
    model = _model()
    for bad in ["bn_invstd_as_var@block1.layer01.conv1", "bn_invstd_as_var@nowhere",
                "checkpoint_detached_inputs"]:
        with pytest.raises(UsageError):
            make_fault(bad).apply(model)
    make_fault("bn_invstd_as_var@head.norm").apply(model)
    with pytest.raises(UsageError, match="already"):
        make_fault("partial_channel_tile@head.norm").apply(model)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10**6), name=st.sampled_from(BUGS + CONTROLS))
def test_unit_drawn_from_seed_is_eligible_and_reproducible(seed, name):
    kw = {"memory_efficient": True} if name == "checkpoint_detached_inputs" else {}
    model = _model(0, padded_pools=name == "pool_pad_offset", **kw)
    a, b = make_fault(name, seed=seed), make_fault(name, seed=seed)
    assert a.choose(model) == b.choose(model)
    assert a.choose(model)[0] in eligible_units(name, model)


class _CatAfterBN(nn.Module):
    """A user-style block: its BN output is the last cat input, so BN's grad_output is a cat slice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([x, self.norm(self.conv(x))], 1)
        return self.head(out.mean((2, 3)) + out.pow(2).mean((2, 3)))


def test_708_bn_sibling_on_a_user_model():
    """PR #2000: the same contiguous read in BN's backward; a user model makes every conv and BN eligible."""
    torch.manual_seed(0)
    clean = _CatAfterBN().double()
    assert eligible_units("strided_read_as_contiguous", clean) == ["conv", "norm"]
    faulty = copy.deepcopy(clean)
    make_fault("strided_read_as_contiguous@norm").apply(faulty)
    x, y = _batch(3)
    gx_c, gw_c, layout = _trace_unit_grads(clean, "norm", x, y)
    gx_f, gw_f, _ = _trace_unit_grads(faulty, "norm", x, y)
    assert not layout.is_contiguous
    assert not _same(gx_f[1:], gx_c[1:]) and not _same(gw_f, gw_c)
    conv_only = copy.deepcopy(clean)  # the conv's grad_output comes from BN's backward: contiguous, unharmed
    make_fault("strided_read_as_contiguous@conv").apply(conv_only)
    _, grads_c, _ = _run(clean, x, y)
    _, grads_v, _ = _run(conv_only, x, y)
    assert all(_same(grads_v[n], grads_c[n]) for n in grads_c)


def test_planted_unit_keeps_its_kind_and_its_fault_through_copies():
    """Judges call ``type(unit).forward`` for the stock op; copies (deep or shallow) keep the fault, bound to them."""
    model = _model()
    make_fault("bn_invstd_as_var@head.norm").apply(model)
    unit = model.head.norm
    assert isinstance(unit, nn.BatchNorm2d) and type(unit).__name__ == "BatchNorm2d"
    assert type(unit).forward is nn.BatchNorm2d.forward
    shallow = copy.copy(unit)  # a structural copy shares nothing bound to the original
    shallow._parameters = {k: nn.Parameter(p.detach().float()) for k, p in unit._parameters.items()}
    shallow._buffers = {k: b.float() if b.is_floating_point() else b.clone() for k, b in unit._buffers.items()}
    x = torch.randn(2, unit.num_features, 3, 3, requires_grad=True)
    out = shallow(x)
    assert out.dtype == torch.float32 and out.grad_fn is not None and "BatchNormFn" in type(out.grad_fn).__name__
    assert planted(copy.deepcopy(model)) == {"head.norm": "bn_invstd_as_var"}
