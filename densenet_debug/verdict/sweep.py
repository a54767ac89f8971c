"""The cat -> conv sweep: the 2017 bug class (pytorch#708) and its layout relatives, case by case vs fp64.

Each case is a tiny network ``split -> cat -> [BN] -> conv -> tail cat`` run through the verdict engine
(every unit teacher-forced in the layout the backend saw, against a float64 oracle). The axes come from
where the historical bugs lived (section 4 of the team's backend bug catalog, not in the repo): batch 1, 2
and odd; channel splits that are not multiples of 8, C=1 and the ambiguous N x C x 1 x 1 shapes; 2 to 4 cat
inputs; contiguous, channels_last and mixed inputs; a conv grad_output that is a non-contiguous cat-backward
slice with a storage offset (the #708 trigger) or a plain one; 1x1 and 3x3 kernels, stride 1 and 2; BN in train or
eval mode, or none, before the conv. :func:`sweep_cases` is importable as pytest parameters.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from densenet_debug import progress
from densenet_debug.backends import Backend, parse_backend
from densenet_debug.models.densenet import Concat
from densenet_debug.verdict.report import FirstDivergence, to_json_or_none

LAYOUTS = ("contiguous", "channels_last", "mixed")
KERNELS = ((1, 1), (3, 1), (3, 2), (1, 2))  # (kernel, stride)
NORMS = ("none", "train", "eval")
GRADS = ("sliced", "plain")
BATCHES = (2, 1, 3, 5)
SPLITS = ((3, 5), (1, 1), (7, 9, 2), (16, 1, 3, 12), (8, 8), (1, 2, 1))
SPATIAL = (4, 1, 7, 8)  # 1: the N x C x 1 x 1 case


@dataclass(frozen=True)
class CatConvCase:
    batch: int
    splits: tuple[int, ...]
    spatial: int
    layout: str
    kernel: int
    stride: int
    norm: str
    grad: str

    @property
    def id(self) -> str:
        return (f"n{self.batch}-c{'.'.join(map(str, self.splits))}-hw{self.spatial}-{self.layout}-k{self.kernel}"
                f"s{self.stride}-bn_{self.norm}-grad_{self.grad}")

    def to_json(self) -> dict:
        return asdict(self) | {"id": self.id}


def sweep_cases() -> list[CatConvCase]:
    """Every layout x kernel/stride x norm x grad combination (72), each with a rotating batch, split and size.

    The rotations (strides found by search, checked in the tests) meet every batch size, split and spatial
    size with every value of every other axis and with each other: all-pairs coverage in 72 cases, so
    batch 1, C = 1 inputs and 1 x 1 maps each meet the sliced grad_output, channels_last, BN eval ...
    """
    cases = []
    for i, (layout, (kernel, stride), norm, grad) in enumerate(itertools.product(LAYOUTS, KERNELS, NORMS, GRADS)):
        batch, spatial = BATCHES[(i // 2 + i) % len(BATCHES)], SPATIAL[(i // 5 + 3 * i) % len(SPATIAL)]
        if norm == "train" and batch * spatial * spatial == 1:
            spatial = 2  # train-mode BN needs more than one value per channel
        cases.append(CatConvCase(batch, SPLITS[(i // 7 + 2 * i) % len(SPLITS)], spatial, layout, kernel, stride,
                                 norm, grad))
    return cases


class Split(nn.Module):
    """Cut the input into the cat's inputs, each in its own memory format (a differentiable copy)."""

    def __init__(self, splits: tuple[int, ...], layout: str) -> None:
        super().__init__()
        self.splits, self.layout = splits, layout

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        parts = []
        for i, part in enumerate(torch.split(x, list(self.splits), dim=1)):
            last = self.layout == "channels_last" or (self.layout == "mixed" and i % 2 == 1)
            parts.append(part.contiguous(memory_format=torch.channels_last if last else torch.contiguous_format))
        return tuple(parts)


class CatConvNet(nn.Module):
    """split -> cat -> [BN] -> conv -> [tail cat with a passthrough, so the conv's grad_output is a slice]."""

    def __init__(self, case: CatConvCase) -> None:
        super().__init__()
        channels = sum(case.splits)
        self.case = case
        self.split = Split(case.splits, case.layout)
        self.cat = Concat()
        if case.norm != "none":
            self.norm = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, 5, case.kernel, stride=case.stride, padding=case.kernel // 2, bias=True)
        if case.grad == "sliced":
            self.tail = Concat()
            self.passthrough = nn.AvgPool2d(case.kernel, stride=case.stride, padding=case.kernel // 2,
                                            count_include_pad=True)

    def forward(self, x: Tensor) -> Tensor:
        parts = self.split(x)
        h = self.cat(*parts)
        if hasattr(self, "norm"):
            h = self.norm(h)
        out = self.conv(h)
        if self.case.grad == "sliced":  # the conv output is the tail cat's last input, as in bamos's layer
            out = self.tail(self.passthrough(parts[0]), out)
        return out


def dot_loss(out: Tensor, target: Tensor) -> Tensor:
    return (out * target).sum()


def case_inputs(case: CatConvCase, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """The case's network (BN with non-trivial affine and running stats) and a seeded input and target."""
    torch.manual_seed(seed)
    net = CatConvNet(case)
    if hasattr(net, "norm"):
        with torch.no_grad():
            net.norm.weight.uniform_(0.5, 1.5)
            net.norm.bias.uniform_(-0.5, 0.5)
            net.norm.running_mean.uniform_(-0.2, 0.2)
            net.norm.running_var.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.batch, sum(case.splits), case.spatial, case.spatial, generator=g)
    with torch.no_grad():
        net.train(case.norm != "eval")
        shape = net(x).shape
    target = torch.randn(shape, generator=g)
    return net, x, target


@dataclass
class CaseResult:
    case: CatConvCase
    verdict: str
    first: FirstDivergence | None
    worst_ratio_a: float
    worst_ratio_b: float
    failing_sides: str

    def to_json(self) -> dict:
        return {"case": self.case.to_json(), "verdict": self.verdict, "first_divergence": to_json_or_none(self.first),
                "worst_ratio_a": self.worst_ratio_a, "worst_ratio_b": self.worst_ratio_b,
                "failing_sides": self.failing_sides}


def run_case(case: CatConvCase, a: str | Backend, b: str | Backend, seed: int = 0, ops: bool = False) -> CaseResult:
    """One case through :func:`densenet_debug.verdict.engine.diff` with a dot-product loss; ``ops``: every aten
    op of both sides judged too, as rows of the same report (:func:`densenet_debug.verdict.ops.merge.add_ops`),
    so a failing case's first divergence names the op (``aten.convolution_backward`` for #708)."""
    from densenet_debug.verdict.engine import diff
    from densenet_debug.verdict.report import FAILING

    net, x, target = case_inputs(case, seed)
    report = diff(net, x, target, a, b, eval_mode=case.norm == "eval", loss_fn=dot_loss)
    if ops:
        from densenet_debug.verdict.ops.merge import add_ops

        add_ops(report, net, x, target, a, b, loss_fn=dot_loss)
    sides = sorted({r.side for r in report.rows if r.status in FAILING and r.side})
    return CaseResult(case, report.verdict, report.first_divergence,
                      max((r.ratio_a or 0.0) for r in report.rows if r.mode == "local"),
                      max((r.ratio_b or 0.0) for r in report.rows if r.mode == "local"), ",".join(sides))


def run_sweep(a: str, b: str, device: str | None = None, cases: Iterable[CatConvCase] | None = None,
              seed: int = 0, ops: bool = False) -> list[CaseResult]:
    ba, bb = parse_backend(a, device), parse_backend(b, device)
    cases = list(cases if cases is not None else sweep_cases())
    results = []
    with progress.step("sweep: cases run", total=len(cases)) as task:
        for c in cases:
            results.append(run_case(c, ba, bb, seed, ops))
            task.advance()
    return results
