"""The engine's shortcuts give what the long way gives: comparisons through the scratch buffer, the bit-equality
test, the unit-name ancestry, unit names resolved once, and the math check left out for models that apply no
custom Function (and run for one that does)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from densenet_debug.verdict import compare as cmp
from densenet_debug.verdict import engine, mathcheck
from densenet_debug.verdict.local import ancestors, inside

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _slow_compare(side: Tensor, oracle: Tensor, bound: Tensor | None) -> tuple[float, float]:
    """(max |side - oracle|, max ratio) the plain way, NaN-free inputs."""
    d = (side.double() - oracle).abs()
    if bound is None:
        return float(d.max()), (0.0 if float(d.max()) == 0 else math.inf)
    ratio = torch.where(d == 0, torch.zeros_like(d), d / bound.double())
    return float(d.max()), float(ratio.max())


@given(seed=st.integers(0, 2**31 - 1), shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       dtype=st.sampled_from(DTYPES), equal=st.booleans(), bounded=st.booleans(), transpose=st.booleans())
@settings(max_examples=80, deadline=None)
def test_compare_through_the_scratch_buffer_is_the_plain_comparison(seed: int, shape: list[int], dtype: torch.dtype,
                                                                    equal: bool, bounded: bool,
                                                                    transpose: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    oracle = torch.randn(shape, generator=g, dtype=torch.float64)
    side = oracle.to(dtype)
    if not equal:
        side = side + torch.randn(shape, generator=g).to(dtype) * 1e-2
    oracle = oracle if not equal else side.double()
    if transpose and side.dim() > 1:  # a strided side against a contiguous truth
        side = side.transpose(0, -1).contiguous().transpose(0, -1)
    bound = torch.rand(shape, generator=g, dtype=torch.float64) * 1e-2 + 1e-6 if bounded else None
    for _ in range(2):  # the second call reuses the buffer the first grew
        got = cmp.compare(side, oracle, bound)
        dmax, ratio = _slow_compare(side, oracle, bound)
        scale = max(float(oracle.abs().max()), 0.0) or 1.0
        assert got.error == pytest.approx(dmax / scale, rel=1e-12, abs=0)
        assert got.ratio == pytest.approx(ratio, rel=1e-12, abs=0) if math.isfinite(ratio) else got.ratio == ratio
        assert cmp.relative_error(side, oracle) == pytest.approx(dmax / scale, rel=1e-12, abs=0)


def test_the_scratch_difference_is_the_absolute_difference() -> None:
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    first = cmp._scratch_difference(a.float(), b)
    expected = (a.float().double() - b).abs()
    assert torch.equal(first, expected)
    assert torch.equal(cmp.abs_difference(a.float(), b), expected)  # the public helper makes its own tensor


@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_equality_is_equality_of_values(dtype: torch.dtype) -> None:
    t = torch.randn(5, 6).to(dtype)
    assert cmp._bit_equal(t, t.double())
    nudged = t.double().clone()
    nudged[2, 3] = torch.nextafter(nudged[2, 3], torch.tensor(math.inf, dtype=torch.float64))
    assert not cmp._bit_equal(t, nudged)  # one float64 ulp off: not equal
    nan = t.double().clone()
    nan[0, 0] = math.nan
    t_nan = t.clone()
    t_nan[0, 0] = math.nan
    assert not cmp._bit_equal(t_nan, nan)  # NaN never equals
    zeros = torch.zeros(3, dtype=dtype)
    assert cmp._bit_equal(-zeros, zeros.double())  # -0 == +0, as the difference says


def test_an_equal_unscaled_comparison_skips_only_the_scale() -> None:
    t = torch.randn(4, 4)
    assert cmp.compare(t, t.double(), None, scaled=False).scale == 1.0
    assert cmp.compare(t, t.double(), None).scale == float(t.abs().max())
    off = t.double() + 1e-3
    assert cmp.compare(t, off, None, scaled=False).ratio == math.inf  # a difference is never skipped


@given(names=st.lists(st.lists(st.sampled_from("abc"), min_size=1, max_size=4).map(".".join), max_size=12))
@settings(max_examples=100, deadline=None)
def test_ancestors_are_the_names_something_lies_inside(names: list[str]) -> None:
    names = list(dict.fromkeys(["", *names]))
    parents = ancestors(names)
    assert {n for n in names if any(inside(m, n) for m in names)} == parents & set(names)


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        return t * 2

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g * 2


class _Small(nn.Module):
    def __init__(self, function: bool) -> None:
        super().__init__()
        self.conv, self.fc, self.function = nn.Conv2d(3, 4, 3), nn.Linear(4, 10), function

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        h = _Scale.apply(h) if self.function else h
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("function", [False, True])
def test_the_math_check_runs_only_for_models_that_apply_a_custom_function(monkeypatch: pytest.MonkeyPatch,
                                                                         function: bool) -> None:
    probes = []
    real = mathcheck.find_calls
    monkeypatch.setattr(mathcheck, "find_calls", lambda *a, **k: probes.append(1) or real(*a, **k))
    torch.manual_seed(0)
    x, y = torch.randn(3, 3, 6, 6), torch.tensor([1, 2, 3])
    report = engine.diff(_Small(function), x, y, "mkldnn", "native")
    assert report.verdict == "agree", report.summary
    assert len(probes) == int(function)
    assert report.settings["math_check"]["functions"] == int(function)


def test_units_are_found_once_per_diff(monkeypatch: pytest.MonkeyPatch) -> None:
    probes = []
    real = engine.discover_units
    monkeypatch.setattr(engine, "discover_units", lambda *a, **k: probes.append(1) or real(*a, **k))
    torch.manual_seed(0)
    x, y = torch.randn(3, 3, 6, 6), torch.tensor([1, 2, 3])
    assert engine.diff(_Small(False), x, y, "mkldnn", "native").verdict == "agree"
    assert len(probes) == 1
    names = engine.unit_names(_Small(False), x, None)
    assert isinstance(names, engine.UnitNames) and engine.unit_names(_Small(False), x, names) is names


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 50), dtype=st.sampled_from(DTYPES),
       special=st.sampled_from([None, math.nan, math.inf, -math.inf]))
@settings(max_examples=60, deadline=None)
def test_the_largest_difference_by_its_extremes_is_the_largest_absolute_one(seed: int, n: int, dtype: torch.dtype,
                                                                            special: float | None) -> None:
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(n, generator=g, dtype=torch.float64)
    side = (o + torch.randn(n, generator=g, dtype=torch.float64) * 1e-3).to(dtype)
    if special is not None:
        side[n // 2] = special
    got = cmp._max_abs_difference(side, o)
    want = float((side.double() - o).abs().max())
    assert (math.isnan(got) and math.isnan(want)) or got == want
    assert math.isinf(cmp.relative_error(side, o)) == (special is not None)


class _WritesItsInput(nn.ReLU):
    """A subclass that writes into its input (``reads_only`` must not trust the ReLU it derives from)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu_(x)


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
        self.conv2, self.writes, self.fc = nn.Conv2d(6, 4, 3, padding=1), _WritesItsInput(), nn.Linear(4, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.writes(self.conv2(self.relu(self.bn(self.conv(x)))))
        return self.fc(h.mean((2, 3)))


def test_units_that_only_read_their_inputs_replay_to_the_same_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    from densenet_debug.verdict import replay

    model = _Mixed()
    assert [replay.reads_only(m) for m in (model.conv, model.bn, model.relu, model.writes)] == [True] * 3 + [False]
    assert not replay.reads_only(nn.ReLU(inplace=True))
    torch.manual_seed(0)
    x, y = torch.randn(3, 3, 6, 6), torch.tensor([1, 2, 3])

    def rows() -> list[tuple]:
        report = engine.diff(model, x, y, "mkldnn", "native")
        assert report.verdict == "agree", report.summary
        return [(r.layer, r.pass_, r.quantity, r.mode, r.error_a, r.error_b, r.tolerance_a, r.tolerance_b)
                for r in report.rows]

    fast = rows()
    monkeypatch.setattr(replay, "reads_only", lambda module: False)  # every input a copy, as before
    assert rows() == fast
