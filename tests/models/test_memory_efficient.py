"""``memory_efficient=True``: the plain model's math, with less kept between forward and backward.

Equality is checked in float64 against the plain model with the same weights: the efficient path runs the
same kernels on the same values (the recompute reproduces them), so outputs and gradients agree to float64
rounding (bounded here at 1e-12 relative, far below any real wiring or statistics bug, which moves them by
O(1)); the BN running buffers are computed once, in the forward both models share, so they must be equal.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from densenet_debug import build_model
from densenet_debug._autograd import in_backward
from densenet_debug.models import DenseNet
from densenet_debug.models.densenet import _DenseLayer

REL = 1e-12


def _pair(name: str, seed: int, **kwargs: object) -> tuple[nn.Module, nn.Module]:
    """The plain and the memory-efficient model, in float64, with the same weights."""
    torch.manual_seed(seed)
    plain = build_model(name, **kwargs).double()
    efficient = build_model(name, memory_efficient=True, **kwargs).double()
    efficient.load_state_dict(plain.state_dict())
    return plain, efficient


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool, seed: int = 0) -> dict:
    """One forward+backward (and, in train mode, one SGD update); what a step produces."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # dropout masks: both models draw the same stream
    out = model(x)
    F.cross_entropy(out, y).backward()
    result = {"out": out.detach(), "x.grad": x.grad}
    result.update({f"grad:{n}": p.grad for n, p in model.named_parameters()})
    if train:
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    return result


def _assert_same_step(plain: nn.Module, efficient: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool,
                      steps: int = 1) -> None:
    for step in range(steps):
        a, b = _step(plain, x, y, train, seed=step), _step(efficient, x, y, train, seed=step)
        assert a.keys() == b.keys()
        for key, ta in a.items():
            tb = b[key]
            assert tb is not None and torch.isfinite(tb).all(), key
            assert (tb - ta).norm() <= REL * ta.norm(), (step, key)
        for (key, ba), bb in zip(plain.state_dict().items(), efficient.state_dict().values()):
            assert torch.equal(ba, bb), (step, key)  # BN running stats and counters: updated exactly once
    if train:
        assert efficient.block1.layer01.norm1.num_batches_tracked.item() == steps


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["densenet-bc-16", "densenet-bc-10"])
def test_efficient_step_equals_plain_step_in_fp64(name: str, train: bool) -> None:
    plain, efficient = _pair(name, seed=0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (3,), generator=g)
    _assert_same_step(plain, efficient, x, y, train, steps=2)


@given(seed=st.integers(0, 2**16), n=st.integers(1, 5), hw=st.sampled_from([8, 12, 16]),
       drop=st.sampled_from([0.0, 0.2]))
@settings(max_examples=12, deadline=None)
def test_efficient_equals_plain_over_seeds_batches_and_dropout(seed: int, n: int, hw: int, drop: float) -> None:
    """Dropout sits inside a checkpointed region: its recompute must redraw the forward's mask."""
    plain, efficient = _pair("densenet-bc-10", seed, drop_rate=drop)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, hw, hw, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    _assert_same_step(plain, efficient, x, y, train=True)


def test_efficient_without_bottleneck_equals_plain() -> None:
    torch.manual_seed(0)
    plain = DenseNet(depth=10, growth_rate=4, bottleneck=False).double()
    efficient = DenseNet(depth=10, growth_rate=4, bottleneck=False, memory_efficient=True).double()
    efficient.load_state_dict(plain.state_dict())
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 7])
    _assert_same_step(plain, efficient, x, y, train=True)


def _live_after_forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> set[str]:
    """Names of the leaf modules whose output storage is still alive between forward and backward."""
    refs: dict[str, StorageWeakRef] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            refs.setdefault(name, StorageWeakRef(out.untyped_storage()))
        return hook

    leaves = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    handles = [m.register_forward_hook(keep(n)) for n, m in leaves]
    try:
        loss = F.cross_entropy(model.train()(x.requires_grad_()), y)
    finally:
        for h in handles:
            h.remove()
    gc.collect()
    live = {n for n, r in refs.items() if not r.expired()}
    loss.backward()
    return live


def test_a_layer_keeps_only_its_two_conv_outputs() -> None:
    """The efficient layer keeps its 1x1 conv's output (the 3x3 region's input) and its new features (for
    the later layers); the cat, both ReLU outputs and both BN outputs are gone until backward recomputes
    them. The plain layer keeps the cat and both ReLU outputs too (so this test can tell the two apart)."""
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    plain, efficient = build_model("densenet-bc-16"), build_model("densenet-bc-16", memory_efficient=True)
    live = {"plain": _live_after_forward(plain, x, y), "efficient": _live_after_forward(efficient, x, y)}
    layers = [n for n, m in plain.named_modules() if isinstance(m, _DenseLayer)]
    for layer in layers:
        kept = {mode: {u for u in ("cat", "norm1", "relu1", "conv1", "norm2", "relu2", "conv2")
                       if f"{layer}.{u}" in names} for mode, names in live.items()}
        # New features are kept for the later layers' recompute; a block's last feed only the block's cat.
        last = layer == max(la for la in layers if la.startswith(layer.split(".")[0]))
        assert kept["efficient"] == ({"conv1"} if last else {"conv1", "conv2"}), layer
        assert {"cat", "relu1", "relu2"} <= kept["plain"], layer
    outside = {mode: {n for n in names if not n.startswith(tuple(f"{la}." for la in layers))}
               for mode, names in live.items()}
    # The rest is the plain model's, plus each block's input: the first of the features the layers keep.
    assert outside["efficient"] == outside["plain"] | {"stem", "trans1.pool", "trans2.pool"}


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.backward: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if in_backward():
            self.backward.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_backward_recomputes_each_dense_bn_as_its_affine_map_and_no_conv() -> None:
    """The recompute stops before each region's conv: no convolution forward runs in backward. Every dense-layer
    BatchNorm (two per layer) comes back as the affine map of its forward's batch statistics, two addcmuls
    (beta, then the output), with no batch reduction: no BatchNorm forward runs in backward at all."""
    model = build_model("densenet-bc-16", memory_efficient=True)
    loss = F.cross_entropy(model.train()(torch.randn(2, 3, 16, 16)), torch.tensor([0, 1]))
    with _Ops() as ops:
        loss.backward()
    layers = sum(isinstance(m, _DenseLayer) for m in model.modules())
    assert ops.backward.count("convolution") == 0
    assert ops.backward.count("convolution_backward") == 2 * layers + 3  # 2 per layer, stem, 2 transitions
    assert ops.backward.count("native_batch_norm") == 0
    assert ops.backward.count("addcmul") == 2 * 2 * layers
    assert ops.backward.count("native_batch_norm_backward") == 2 * layers + 3  # the forward's training nodes
    assert ops.backward.count("cat") == layers  # each layer's concatenation, not the blocks'
