"""The per-unit shortcuts of the judge (issue 13) change no value: a replay operand placed in one cast equals
the cast-then-``with_layout`` it replaces, in values, strides and offset, and never aliases the record; the
ReLU kink search on the side's own dtype finds the same elements and margins; the oracle's finiteness memo
never hides a NaN written after the first scan."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from densenet_debug.trace import Layout, Trace, UnitRecord, with_layout
from densenet_debug.verdict import kinks
from densenet_debug.verdict.nonfinite import NonFiniteOracle, check_oracle
from densenet_debug.verdict.replay import placed


@st.composite
def layouts(draw) -> tuple[tuple[int, ...], Layout]:
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    order = draw(st.permutations(range(len(shape))))  # a dense layout in any dimension order
    stride, step = [0] * len(shape), 1
    for d in reversed(order):
        stride[d] = step
        step *= shape[d]
    if draw(st.booleans()):  # room around the view, as a cat slice has
        stride = [s * draw(st.integers(1, 2)) for s in stride]
    offset = draw(st.integers(0, 3)) if draw(st.booleans()) else 0
    return shape, Layout(shape, tuple(stride), offset)


@settings(max_examples=60, deadline=None)
@given(layouts(), st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), st.integers(0, 2**31 - 1),
       st.booleans())
def test_placed_is_the_cast_with_layout_in_a_fresh_buffer(case, dtype, seed, with_layout_given) -> None:
    shape, layout = case
    t = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    lay = layout if with_layout_given else None
    got = placed(t, dtype, torch.device("cpu"), lay)
    want = with_layout(t.to(dtype), lay)
    assert got.dtype == dtype and torch.equal(got, want)
    if lay is not None:
        assert (tuple(got.stride()), got.storage_offset()) == (layout.stride, layout.storage_offset)
        if layout.is_contiguous:  # the shortcut: nothing around the view
            assert got.untyped_storage().nbytes() == got.numel() * got.element_size()
        else:  # the rest of the layout's buffer holds with_layout's fill
            full = torch.empty(0, dtype=dtype).set_(got.untyped_storage())
            assert torch.equal(full, torch.empty(0, dtype=dtype).set_(want.untyped_storage()))
    assert got.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_relu_kinks_on_the_sides_dtype_are_the_float64_ones(seed, dtype) -> None:
    g = torch.Generator().manual_seed(seed)
    oracle = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=g)
    oracle[0, 0, :2] = 0.0  # ties at the boundary
    side = (oracle + 1e-3 * torch.randn(oracle.shape, dtype=torch.float64, generator=g)).to(dtype)
    site = kinks.find("u", 0, nn.ReLU(), oracle, side)
    flipped = (oracle > 0) != (side.to(torch.float64) > 0)
    if not flipped.any():
        assert site is None
        return
    assert site is not None and torch.equal(site.mask, flipped) and site.count == int(flipped.sum())
    assert site.min_margin == float(oracle.abs()[flipped].min())
    assert site.relative_margin == site.min_margin / float(oracle.abs().max())
    assert torch.equal(site.side_branch, (side.to(torch.float64) > 0).to(torch.float64))


def _trace(value: float) -> Trace:
    rec = UnitRecord("u", "Linear", 0, True, inputs=[torch.ones(3)], outputs=[torch.full((3,), value)])
    return Trace({"u": rec}, output=rec.outputs[0], loss=torch.tensor(0.0))


def test_the_finiteness_memo_sees_later_writes_and_replacements() -> None:
    trace = _trace(1.0)
    check_oracle([trace])
    check_oracle([trace])  # remembered
    trace["u"].outputs[0][1] = math.nan  # written in place after the first scan
    with pytest.raises(NonFiniteOracle):
        check_oracle([trace])
    other = _trace(1.0)
    check_oracle([other])
    other["u"].outputs[0] = torch.tensor([1.0, math.inf, 1.0])  # replaced by another tensor
    with pytest.raises(NonFiniteOracle):
        check_oracle([other])
