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
from densenet_debug.models import DenseNet, densenet
from densenet_debug.models.densenet import _affine_from_stats, _DenseLayer

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


@given(seed=st.integers(0, 2**16), growth=st.integers(1, 6), bn_size=st.integers(1, 4), bottleneck=st.booleans(),
       drop=st.sampled_from([0.0, 0.3]), n=st.integers(1, 4))
@settings(max_examples=12, deadline=None)
def test_efficient_equals_plain_for_each_growth_bottleneck_and_dropout(seed: int, growth: int, bn_size: int,
                                                                       bottleneck: bool, drop: float, n: int) -> None:
    """Every layer shape the recompute meets: channel counts from the growth rate and bottleneck width (a
    bottleneck of one channel included), with and without the 1x1 and dropout."""
    torch.manual_seed(seed)
    kw = dict(depth=10 if bottleneck else 7, growth_rate=growth, bottleneck=bottleneck, bn_size=bn_size,
              drop_rate=drop)
    plain, efficient = DenseNet(**kw).double(), DenseNet(memory_efficient=True, **kw).double()
    efficient.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)
    _assert_same_step(plain, efficient, x, y, train=True, steps=2)


@pytest.mark.parametrize("bottleneck", [True, False], ids=["bc", "plain-densenet"])
def test_efficient_step_is_bit_identical_to_plain_in_fp32(bottleneck: bool) -> None:
    """The recompute reproduces the forward to the bit (the BN's affine map from its own statistics included),
    and backward runs the same nodes on the same values, so a float32 step equals the plain one exactly."""
    torch.manual_seed(0)
    kw = dict(depth=16 if bottleneck else 10, growth_rate=6, bottleneck=bottleneck, drop_rate=0.2)
    plain, efficient = DenseNet(**kw), DenseNet(memory_efficient=True, **kw)
    efficient.load_state_dict(plain.state_dict())
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 5, 9])
    a, b = _step(plain, x, y, train=True), _step(efficient, x, y, train=True)
    for key, ta in a.items():
        assert torch.equal(ta, b[key]), key
    for (key, ba), bb in zip(plain.state_dict().items(), efficient.state_dict().values()):
        assert torch.equal(ba, bb), key


@given(seed=st.integers(0, 2**16), n=st.integers(1, 5), c=st.integers(1, 40), hw=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.float64]), affine=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-3, 0.0]), channels_last=st.booleans())
@settings(max_examples=60, deadline=None)
def test_affine_from_stats_is_the_training_kernels_output_to_the_bit(seed: int, n: int, c: int, hw: int,
                                                                     dtype: torch.dtype, affine: bool, eps: float,
                                                                     channels_last: bool) -> None:
    """The ATen CPU kernel computes x*alpha + beta with fused multiply-adds (alpha = invstd*weight, beta =
    bias - mean*alpha); the recompute mirrors it, so the two agree exactly, vector loop and its tail alike
    (hw*hw from 1 to 81 elements a plane) and in both memory layouts. A torch whose kernel computes otherwise
    fails here: its recompute would no longer reproduce the forward bit for bit."""
    if n * hw * hw == 1:
        n = 2  # training BN needs more than one value a channel
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 2, c, dtype=dtype).view(1, c, 1, 1)
    x = torch.randn(n, c, hw, hw, generator=g, dtype=dtype) * scale + torch.randn(1, c, 1, 1, generator=g, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.rand(c, generator=g, dtype=dtype) + 0.5 if affine else None
    b = torch.randn(c, generator=g, dtype=dtype) if affine else None
    out, mean, invstd = torch.native_batch_norm(x, w, b, None, None, True, 0.1, eps)
    assert torch.equal(_affine_from_stats(x, w, b, mean, invstd), out)


def test_a_second_backward_through_the_kept_graph_recomputes_alike() -> None:
    """``retain_graph``: the second backward recomputes each region again from the same statistics (and the
    running statistics still move once): gradients accumulate to twice the plain model's."""
    plain, efficient = _pair("densenet-bc-10", seed=3)
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 2, 3])
    grads = []
    for model in (plain, efficient):
        loss = F.cross_entropy(model.train()(x), y)
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for key, ga in grads[0].items():
        assert (grads[1][key] - ga).norm() <= REL * ga.norm(), key
    for (key, ba), bb in zip(plain.state_dict().items(), efficient.state_dict().values()):
        assert torch.equal(ba, bb), key


def test_a_batch_norm_it_cannot_mirror_is_recomputed_in_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off the CPU float kernels (a GPU or mixed-precision BN) the recompute runs the BN itself: still the
    plain model's step, running statistics still updated once."""
    monkeypatch.setattr(densenet, "_reusable", lambda bn: False)
    plain, efficient = _pair("densenet-bc-10", seed=5)
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([4, 6])
    _assert_same_step(plain, efficient, x, y, train=True, steps=2)
    loss = F.cross_entropy(efficient.train()(x), y)
    with _Ops() as ops:
        loss.backward()
    layers = sum(isinstance(m, _DenseLayer) for m in efficient.modules())
    assert ops.backward.count("native_batch_norm") == 2 * layers and "addcmul" not in ops.backward
    assert ops.backward.count("relu") == 2 * layers and "relu_" not in ops.backward  # the BN's own output kept


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
    # each ReLU works in place on the affine map's output, which nothing saved
    assert ops.backward.count("relu_") == 2 * layers and "relu" not in ops.backward
    assert ops.backward.count("native_batch_norm_backward") == 2 * layers + 3  # the forward's training nodes
    assert ops.backward.count("cat") == layers  # each layer's concatenation, not the blocks'
