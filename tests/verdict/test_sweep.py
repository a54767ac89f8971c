"""The cat -> conv sweep: coverage of the bug-class axes, quiet on correct kernels, loud on the #708 fault."""

from __future__ import annotations

import itertools

import pytest
import torch

from densenet_debug.trace import trace_step
from densenet_debug.verdict.sweep import (
    BATCHES,
    GRADS,
    KERNELS,
    LAYOUTS,
    NORMS,
    SPATIAL,
    SPLITS,
    case_inputs,
    run_case,
    sweep_cases,
)

CASES = sweep_cases()


def test_cases_cover_every_axis_pairwise() -> None:
    assert len(CASES) == len(LAYOUTS) * len(KERNELS) * len(NORMS) * len(GRADS)
    assert len({c.id for c in CASES}) == len(CASES)
    rotating = {"batch": BATCHES, "splits": SPLITS, "spatial": SPATIAL}
    fixed = {"layout": LAYOUTS, "kernel": {k for k, _ in KERNELS}, "norm": NORMS, "grad": GRADS}
    for (name, values), (other, others) in itertools.product(rotating.items(), fixed.items()):
        seen = {(getattr(c, name), getattr(c, other)) for c in CASES}
        missing = {(v, o) for v in values for o in others} - seen
        if name == "spatial":  # train-mode BN cannot take a single value per channel: 1x1 maps meet it at n > 1
            missing = {(v, o) for v, o in missing if v != 1}
        assert not missing, (name, other, missing)
    assert any(c.batch == 1 and c.grad == "sliced" and 1 in c.splits for c in CASES)
    assert any(c.spatial == 1 and c.grad == "sliced" and c.batch > 1 for c in CASES)
    assert {len(c.splits) for c in CASES} == {2, 3, 4}


@pytest.mark.parametrize("case", [c for c in CASES if c.grad == "sliced" and c.batch > 1][:6], ids=lambda c: c.id)
def test_the_conv_grad_output_really_is_an_offset_non_contiguous_slice(case) -> None:
    net, x, target = case_inputs(case)
    trace = trace_step(net, x, target, units=["conv", "cat"], loss_fn=lambda o, t: (o * t).sum())
    layout = trace["conv"].grad_output_layouts[0]
    assert layout.storage_offset > 0 and not layout.is_contiguous
    if case.layout == "channels_last":
        assert all(t.is_contiguous(memory_format=torch.channels_last) for t in trace["cat"].inputs)


def test_correct_backends_agree_on_every_case() -> None:
    bad = [c.id for c in CASES if run_case(c, "mkldnn", "native").verdict != "agree"]
    assert not bad


def test_the_708_fault_fails_exactly_the_sliced_multi_sample_cases() -> None:
    flagged = {c.id for c in CASES
               if run_case(c, "native", "native+fault:strided_read_as_contiguous@conv").verdict == "mismatch"}
    expected = {c.id for c in CASES if c.grad == "sliced" and c.batch > 1}
    assert flagged == expected


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cudnn_against_native_cuda(case) -> None:
    result = run_case(case, "cudnn", "no-cudnn")
    assert result.verdict == "agree", result.first


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES[::6], ids=lambda c: c.id)
def test_cudnn_channels_last_and_benchmark(case) -> None:
    assert run_case(case, "cudnn+channels_last", "cudnn-benchmark").verdict == "agree"


@pytest.mark.parametrize("case", [c for c in CASES if c.grad == "sliced" and c.batch > 1][::9], ids=lambda c: c.id)
def test_with_ops_a_708_case_names_the_backward_conv_and_a_correct_pair_agrees(case) -> None:
    bad = run_case(case, "native", "native+fault:strided_read_as_contiguous@conv", ops=True)
    assert bad.verdict == "mismatch"
    first = bad.first if isinstance(bad.first, dict) else bad.first.to_json()
    assert first["layer"] == "conv" and first["op"] == "aten.convolution_backward", first
    assert run_case(case, "mkldnn", "native", ops=True).verdict == "agree"
