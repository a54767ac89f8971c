"""A model that returns log-probabilities, judged whole in eval mode (the research-code style: ``F.relu`` and the
concatenation in the layer's forward, ``F.log_softmax(self.fc(torch.squeeze(...)))`` as the output).

The model's own forward is a composite unit bounded by the generic |.|-evaluation. ``log_softmax`` at the
magnitudes of its operands is ``|log_softmax(m)|``, ~0 for the class far ahead; in eval mode BN's running
statistics (0 and 1 at initialisation) do not normalise the magnitudes, so one class is far ahead and the bound
there collapsed to ~1e-13 of the scale: a correct fp32 side failed at the model's forward output, and that row
came first, ahead of a planted fault's own unit. Its magnitude is the sum of its terms, ``m_i + max m + log K``
(:mod:`densenet_debug.verdict.magnitude`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from densenet_debug.verdict.engine import diff
from densenet_debug.verdict.magnitude import MagnitudeMode


class Layer(nn.Module):
    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, 4 * k, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(4 * k), nn.Conv2d(4 * k, k, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat((x, out), 1)


class Net(nn.Module):
    def __init__(self, k: int = 4, n: int = 2) -> None:
        super().__init__()
        c = 2 * k
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        layers = []
        for _ in range(n):
            layers.append(Layer(c, k))
            c += k
        self.dense = nn.Sequential(*layers)
        self.bn, self.fc = nn.BatchNorm2d(c), nn.Linear(c, 10)

    def forward(self, x: Tensor) -> Tensor:
        out = self.dense(self.stem(x))
        out = torch.squeeze(F.avg_pool2d(F.relu(self.bn(out)), out.shape[-1]))
        return F.log_softmax(self.fc(out), dim=-1)


def _case(seed: int = 0, batch: int = 4, size: int = 8) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    net = Net()
    g = torch.Generator().manual_seed(seed)
    return net, torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=1, max_size=12), st.integers(0, 2**31 - 1))
def test_log_softmax_magnitude_bounds_its_terms_and_its_sensitivity(values: list[float], seed: int) -> None:
    """``M_i >= |x_i| + |max x| + |log S|`` (its terms), and a perturbation of the operand within its magnitude
    moves the result by at most ``M``."""
    x = torch.tensor(values, dtype=torch.float64)
    with MagnitudeMode():
        m = torch.log_softmax(x, 0)
    log_s = (x - x.max()).exp().sum().log()
    assert bool((m >= x.abs() + x.max().abs() + log_s.abs() - 1e-12).all())
    d = (torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1) * x.abs()
    moved = (torch.log_softmax(x + d, 0) - torch.log_softmax(x, 0)).abs()
    assert bool((moved <= m + 1e-12).all())


def test_a_correct_backend_agrees_on_a_log_softmax_model_in_eval_mode() -> None:
    net, x, y = _case()
    report = diff(net, x, y, "native", "native", eval_mode=True)
    assert report.verdict == "agree", report.summary
    root = [r for r in report.rows if r.layer == "" and r.mode == "local" and r.quantity == "output"]
    assert root and root[0].tolerance > 1e-9  # u-sized on the scale of the terms, not a cancelled ~1e-13


def test_a_wrong_eval_backward_is_localised_at_its_batch_norm() -> None:
    net, x, y = _case()
    report = diff(net, x, y, "native+fault:bn_eval_backward_uses_batch_stats@bn", "native", eval_mode=True)
    first = report.first_divergence
    assert report.verdict == "mismatch"
    assert (first["layer"], first["pass"], first["side"]) == ("bn", "backward", "a"), report.summary
