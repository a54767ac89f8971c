"""Every dropout off while judging, functional ones too: torchvision's ``_DenseLayer`` with ``drop_rate > 0``
calls ``F.dropout(x, p, self.training)`` in its ``forward``. Drawn while judging, its masks differ between
dtypes and a replay of the layer draws anew: every correct backend failed at that layer ("error 0.00185 >
tolerance 1.1e-05" at the model's own unit). Modules were already off (``judging_mode``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from densenet_debug.models.copies import dropout_off
from densenet_debug.verdict.engine import diff


class _Layer(nn.Module):
    """torchvision's shape: BN-ReLU-conv, then a functional dropout, concatenated with the input."""

    def __init__(self, c: int, k: int, drop: float, style: str) -> None:
        super().__init__()
        self.norm, self.conv = nn.BatchNorm2d(c), nn.Conv2d(c, k, 3, padding=1, bias=False)
        self.drop, self.style = drop, style

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(F.relu(self.norm(x)))
        if self.style == "functional":
            out = F.dropout(out, p=self.drop, training=self.training)
        elif self.style == "channels":
            out = F.dropout2d(out, p=self.drop, training=self.training)
        else:
            out = torch.dropout(out, self.drop, self.training)
        return torch.cat([x, out], 1)


class _Net(nn.Module):
    def __init__(self, drop: float, style: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.layers = nn.Sequential(_Layer(4, 3, drop, style), _Layer(7, 3, drop, style))
        self.fc = nn.Linear(10, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def _data(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 8, 8, generator=g), torch.randint(0, 5, (3,), generator=g)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), drop=st.sampled_from([0.2, 0.5]),
       style=st.sampled_from(["functional", "channels", "torch"]))
def test_functional_dropout_agrees_on_correct_backends(seed: int, drop: float, style: str) -> None:
    torch.manual_seed(seed)
    report = diff(_Net(drop, style), *_data(seed), "mkldnn", "native")
    assert report.verdict == "agree", report.summary


@pytest.mark.parametrize("inplace", [False, True])
def test_dropout_off_returns_the_input_and_draws_nothing(inplace: bool) -> None:
    x = torch.randn(4, 5)
    state = torch.get_rng_state()
    with dropout_off():
        y = F.dropout(x, 0.5, training=True, inplace=inplace)
        z = nn.Dropout(0.5).train()(x)
    assert torch.equal(y, x) and torch.equal(z, x)
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn from the generator
    assert not torch.equal(F.dropout(x, 0.5, training=True), x)  # outside, dropout is itself again


def test_the_mode_is_entered_only_for_models_whose_code_can_call_dropout(tmp_path) -> None:  # noqa: ANN001
    """A Python mode costs every torch call while it is on (about 15 % of a diff): models that cannot call a
    dropout function (ours, with nn.Dropout modules at most) run without it."""
    import importlib.util

    from densenet_debug.models import build_model
    from densenet_debug.models.copies import _DropoutOff, calls_dropout

    assert not calls_dropout(build_model("densenet-bc-10"))
    assert isinstance(dropout_off(_Net(0.2, "functional")), _DropoutOff)  # this file calls F.dropout(
    assert not isinstance(dropout_off(build_model("densenet-bc-10")), _DropoutOff)
    assert calls_dropout(nn.MultiheadAttention(8, 2))  # torch's own: its dropout_p reaches a functional dropout
    assert not calls_dropout(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Dropout(0.5)))
    for body, expected in (("self.drop = nn.Dropout(0.3)", False), ("self.p = 0.3  # F.dropout(x, self.p)", True)):
        path = tmp_path / f"m{int(expected)}.py"  # a --model file, loaded without registering it
        path.write_text("from torch import nn\n\nclass M(nn.Module):\n    def __init__(self):\n"
                        f"        super().__init__()\n        {body}\n\n    def forward(self, x):\n        return x\n")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert calls_dropout(module.M()) is expected
    namespace: dict = {"nn": nn}
    exec("class NoFile(nn.Module):\n    def forward(self, x):\n        return x\n", namespace)  # a notebook's
    assert calls_dropout(namespace["NoFile"]())  # no source to read: it may
