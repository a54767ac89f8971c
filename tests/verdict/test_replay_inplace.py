"""Teacher-forced replay of units that write into their inputs (torchvision's ``nn.ReLU(inplace=True)``).

Autograd forbids an in-place write into a leaf that requires grad (or a view of one); the replay hands units
a non-leaf view in the side's layout instead. These tests pin that the in-place model's verdict and figures
are those of its out-of-place twin, that the replay sees the side's layout, and that a planted #708 fault on
such a model is still caught.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from densenet_debug.trace import Layout, with_layout
from densenet_debug.verdict.engine import diff
from densenet_debug.verdict.replay import grad_entry, input_grad

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "capture"))
from capture_models import batch, build  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 3), st.integers(0, 1_000))
def test_grad_entry_keeps_layout_and_gives_the_inputs_gradient(n: int, c: int, offset: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(n, c, 3, 3, generator=g, dtype=torch.float64)
    wide = Layout((n, c, 3, 3), (2 * c * 9, 9, 3, 1), offset)  # a channel slice of a wider cat gradient
    x = with_layout(value, wide)
    entry, leaf = grad_entry(x)
    assert (entry.stride(), entry.storage_offset()) == (x.stride(), x.storage_offset())
    assert torch.equal(entry, value) and not entry.is_leaf
    weight = torch.randn(value.shape, generator=g, dtype=torch.float64)
    out = torch.relu_(entry * 1) * weight  # an in-place op downstream of the entry is allowed
    torch.relu_(entry)  # and so is one on the entry itself (a view of a non-leaf)
    (grad,) = torch.autograd.grad((out.sum(),), (leaf,))
    assert torch.equal(input_grad(x, leaf, grad), weight * (value > 0))


@pytest.mark.parametrize("efficient", [False, True], ids=["plain", "checkpointed"])
def test_inplace_model_verdict_and_figures_equal_its_out_of_place_twin(efficient: bool) -> None:
    x, y = batch(n=4, seed=1)
    reports = {}
    for inplace in (True, False):
        model = build("torchvision", seed=0, inplace=inplace, efficient=efficient)
        reports[inplace] = diff(model, x, y, "mkldnn", "native")
    assert reports[True].verdict == reports[False].verdict == "agree"
    rows = {inplace: {(r.side, r.layer, r.pass_, r.quantity, r.origin): r.error for r in rep.rows
                      if r.origin == "local"} for inplace, rep in reports.items()}
    assert rows[True].keys() == rows[False].keys()
    assert all(rows[True][k] == pytest.approx(rows[False][k], rel=1e-6, abs=1e-12) for k in rows[True])


def test_planted_708_on_an_inplace_model_is_caught_where_planted() -> None:
    x, y = batch(n=4, seed=0)
    model = build("torchvision", seed=0, inplace=True)
    # Only a conv whose output feeds a single cat gets the bare slice (#708); fan-out sums are contiguous.
    report = diff(model, x, y, "native", "native+fault:strided_read_as_contiguous@layers.2.conv2")
    assert report.verdict == "mismatch"
    assert report.first_divergence["layer"] == "layers.2.conv2"
    assert report.first_divergence["pass"] == "backward" and report.first_divergence["mode"] == "local"
