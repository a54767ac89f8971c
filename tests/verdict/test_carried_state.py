"""State carried between steps: what the model's own code changes in every backend is no finding.

A BatchNorm inside a non-reentrant ``torch.utils.checkpoint`` region updates its running statistics again when
backward recomputes it (torchvision's memory-efficient DenseNet does this). It happens in the float64 oracle too,
so ``diff --steps 2`` must not call it a backend's fault; a change only one side makes still is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from densenet_debug.verdict.engine import diff


class CheckpointedLayer(nn.Module):
    """torchvision's bottleneck under checkpoint: BN and an in-place ReLU recomputed in backward."""

    def __init__(self, c: int, k: int, halve_on_float32: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(c, k, 3, padding=1, bias=False)
        self.halve_on_float32 = halve_on_float32

    def bottleneck(self, *features: Tensor) -> Tensor:
        return self.conv(self.relu(self.norm(torch.cat(features, 1))))

    def forward(self, *features: Tensor) -> Tensor:
        out = cp.checkpoint(self.bottleneck, *features, use_reentrant=False)
        if self.halve_on_float32 and out.dtype == torch.float32 and out.requires_grad:
            out.register_hook(self._halve)  # a side that touches the statistics in backward: a finding
        return out

    def _halve(self, grad: Tensor) -> None:
        self.norm.running_mean.data.mul_(0.5)


class Net(nn.Module):
    def __init__(self, faulty: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.layers = nn.ModuleList([CheckpointedLayer(4, 3), CheckpointedLayer(7, 3, faulty)])
        self.fc = nn.Linear(10, 5)

    def forward(self, x: Tensor) -> Tensor:
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(*features))
        return self.fc(F.adaptive_avg_pool2d(torch.cat(features, 1), 1).flatten(1))


def _data(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 6, 6, generator=g), torch.randint(0, 5, (3,), generator=g)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_a_checkpoint_recomputing_batch_norm_agrees_over_steps(seed: int) -> None:
    torch.manual_seed(seed)
    report = diff(Net(), *_data(seed), "mkldnn", "native", steps=2)
    carried = [r for r in report.rows if r.quantity.endswith("(carried)")]
    assert report.verdict == "agree", report.summary
    changed = [r for r in carried if r.error_a > 0]
    assert changed and all("oracle too" in r.note for r in changed)  # the recompute's second update, named
    assert all(0 < r.error_a <= r.tolerance for r in changed)  # judged against the oracle's, under a bound
    counters = [r for r in carried if r.quantity.startswith("num_batches_tracked")]
    assert counters and all(r.tolerance == 0 and r.error_a == 0 for r in counters)  # an integer: exact


def test_a_side_that_touches_the_statistics_between_steps_is_still_caught() -> None:
    torch.manual_seed(0)
    report = diff(Net(faulty=True), *_data(0), "native", "fp64", steps=2)
    first = report.first_divergence
    assert (first["layer"], first["quantity"], first["step"]) == ("layers.1.norm", "running_mean (carried)", 1)
