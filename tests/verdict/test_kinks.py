"""Kinks: a ReLU input within rounding of zero flips in fp32; diff explains it instead of calling it a bug."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from densenet_debug.verdict import kinks
from densenet_debug.verdict.engine import diff


class Offset(nn.Module):
    """``(x + t) - c``: in fp32, 1 + 2**-30 rounds to 1, so the result is 0 where fp64 gives 2**-30."""

    def __init__(self, width: int) -> None:
        super().__init__()
        t = torch.zeros(width)
        t[0] = 2.0**-30
        self.register_buffer("t", t)
        self.register_buffer("c", torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return (x + self.t) - self.c


def boundary_model() -> nn.Module:
    torch.manual_seed(0)
    first = nn.Linear(4, 4)
    with torch.no_grad():  # feature 0 is exactly 1 for every sample, so the ReLU sees 2**-30 in fp64, 0 in fp32
        first.weight[0].zero_()
        first.bias[0] = 1.0
        first.bias[1:] = 1.0
    return nn.Sequential(first, Offset(4), nn.ReLU(), nn.Linear(4, 3))


def test_input_at_a_relu_boundary_is_a_kink_not_a_mismatch() -> None:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2])
    report = diff(boundary_model(), x, y, "native", "fp64")
    assert report.verdict == "agree", report.summary
    relu_kinks = [k for k in report.kinks if k.layer == "2" and k.side == "a"]
    assert relu_kinks and relu_kinks[0].count == 3 and relu_kinks[0].min_margin == 2.0**-30
    assert not [k for k in report.kinks if k.side == "b"]  # fp64 is the oracle's own arithmetic
    kink_rows = [r for r in report.rows if r.status == "kink"]
    assert kink_rows and all(r.pass_ == "backward" and r.mode == "propagated" for r in kink_rows)
    assert any(r.layer == "0" and r.quantity == "grad_weight" for r in kink_rows)
    assert all(r.status == "ok" for r in report.rows if r.mode == "local")
    strict = diff(boundary_model(), x, y, "native", "fp64", fail_on="kink")
    assert strict.verdict == "mismatch" and strict.first_divergence["status"] == "kink"


def test_forcing_keeps_values_and_reroutes_the_gradient() -> None:
    relu = nn.ReLU()
    xo = torch.tensor([[-1e-9, 2.0, 3e-9, -4.0]], dtype=torch.float64)
    xs = torch.tensor([[1e-9, 2.0, -1e-9, -4.0]], dtype=torch.float64)
    site = kinks.find("relu", 0, relu, xo, xs)
    assert site.count == 2 and site.min_margin == 1e-9
    assert site.mask.tolist() == [[True, False, True, False]]
    x = xo.clone().requires_grad_(True)
    handle = relu.register_forward_hook(kinks.forcing_hook(site))
    out = relu(x)
    handle.remove()
    assert torch.equal(out, torch.relu(xo))  # values bit-identical
    (g,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert g.tolist() == [[1.0, 1.0, 0.0, 0.0]]  # the side's branches at the two flipped elements


def test_max_pool_ties_are_kinks() -> None:
    pool = nn.MaxPool2d(2)
    xo = torch.tensor([[[[1.0, 1.0 + 1e-12], [0.0, 0.0]]]], dtype=torch.float64)
    xs = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]], dtype=torch.float64)
    site = kinks.find("pool", 0, pool, xo, xs)
    assert site is not None and site.count == 1 and abs(site.min_margin - 1e-12) < 1e-15
    assert kinks.find("pool", 0, pool, xo, xo) is None


def test_the_kept_graph_and_the_rerun_give_the_same_counterfactual() -> None:
    """Both ways to build the counterfactual oracle (one more backward, or the whole fp64 step again) agree."""
    from densenet_debug.backends import parse_backend
    from densenet_debug.trace import trace_step
    from densenet_debug.verdict import counterfactual
    from densenet_debug.verdict.engine import oracle_traces, release
    from densenet_debug.verdict.propagated import kink_sites

    model = boundary_model()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2])
    oracle = oracle_traces(model, x, y, steps=2)
    side = parse_backend("native")
    prepared = side.prepare_model(model)
    with side.active():
        s_trace = trace_step(prepared, x, y)
    sites = kink_sites(list(oracle[0].units), 0, oracle[0], s_trace, dict(prepared.named_modules()))
    assert [s.layer for s in sites] == ["2"]
    kept = oracle[0].retained.gradients(sites)
    rerun = counterfactual.rerun_gradients(model.double(), x.double(), y, oracle[0], sites, list(oracle[0].units),
                                           torch.nn.functional.cross_entropy)
    assert kept.keys() == rerun.keys()
    for unit, grads in kept.items():
        for key, g in grads.items():
            if g is not None:
                assert torch.allclose(g, rerun[unit][key], rtol=1e-12, atol=1e-15), (unit, key)
    assert not torch.equal(kept["0"]["grad_weight"], oracle[0]["0"].param_grads["weight"])  # the kinks matter
    release(oracle)
    assert oracle[0].retained is None


def test_the_branch_derivative_of_an_inplace_relu_runs_on_a_float64_leaf() -> None:
    """The counterfactual asks an ``nn.ReLU(inplace=True)`` (torchvision style) for its branch on float64
    values: it must not write the leaf it differentiates (it crashed diff on a checkpointed user model)."""
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    assert kinks.derivative(nn.ReLU(inplace=True), x).tolist() == [0.0, 1.0, 1.0]
    assert x.tolist() == [-1.0, 0.5, 2.0]
