"""Which ops write what, and copy-on-write of kept aliases."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from densenet_debug.capture.cow import CopyOnWrite
from densenet_debug.capture.writes import is_mutating, written_tensors

aten = torch.ops.aten


def test_batch_norm_running_stat_writes_are_known_though_undeclared() -> None:
    x, w, b = torch.randn(4, 3, 2, 2), torch.ones(3), torch.zeros(3)
    mean, var = torch.zeros(3), torch.ones(3)
    args = (x, w, b, mean, var, True, 0.1, 1e-5)
    assert [id(t) for t in written_tensors(aten.native_batch_norm.default, args, {})] == [id(mean), id(var)]
    evaluating = (*args[:5], False, 0.1, 1e-5)
    assert list(written_tensors(aten.native_batch_norm.default, evaluating, {})) == []
    assert is_mutating(aten.relu_.default) and not is_mutating(aten.relu.default)
    out = torch.empty(3)
    assert [id(t) for t in written_tensors(aten.add.out, (mean, var), {"out": out})] == [id(out)]


@given(n=st.integers(1, 5), start=st.integers(0, 3))
@settings(max_examples=10, deadline=None)
def test_watched_aliases_keep_their_value_across_in_place_writes(n: int, start: int) -> None:
    base = torch.randn(8, n)
    kept = [base[start:].detach(), base.detach(), base[start:].detach()]
    before = [t.clone() for t in kept]
    with CopyOnWrite() as cow:
        for i in range(len(kept)):
            cow.watch(kept, i, label=f"slot{i}")
        base.relu_()  # a write to the storage every alias lives on
        base.add_(1)
    for t, b in zip(kept, before):
        assert torch.equal(t, b)
    assert cow.watcher.copies == (1 if start == 0 else 2)  # one copy per distinct view, shared by its slots
    assert kept[0] is kept[2] and cow.stale() == []


def test_a_write_the_mode_did_not_see_is_reported_stale() -> None:
    base = torch.randn(4)
    kept = [base.detach()]
    with CopyOnWrite() as cow:
        cow.watch(kept, 0, label="unit.output")
    base.mul_(2)  # after the mode exited: no copy, but the version moved
    assert cow.stale() == ["unit.output"]
