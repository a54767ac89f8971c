"""DenseNet and DenseNet-BC for 32x32 inputs (Huang et al. 2017), faithful to the seed and the Lua code.

Every op lives in a named leaf module (the concatenations, ReLUs and pools included), so a fault can be
charged to a name such as ``block2.layer07.conv2``. ReLUs are not in-place, so every unit's output stays
what it produced (the committed fixtures record them so); in-place models of users trace as well.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.utils.checkpoint as cp
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from densenet_debug._autograd import in_backward


class Concat(nn.Module):
    """Channel concatenation as its own unit, so its backward (the #708 trigger) has a name."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *inputs: Tensor) -> Tensor:
        return torch.cat(inputs, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class _DenseLayer(nn.Module):
    """cat -> BN -> ReLU -> conv (1x1 to bn_size*k if bottleneck) [-> BN -> ReLU -> 3x3 conv to k]."""

    def __init__(
        self, in_channels: int, growth_rate: int, bottleneck: bool, bn_size: int, drop_rate: float,
        memory_efficient: bool,
    ) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.memory_efficient = memory_efficient
        self.cat = Concat()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        if bottleneck:
            inter = bn_size * growth_rate
            self.conv1 = nn.Conv2d(in_channels, inter, 1, bias=False)
            if drop_rate > 0:  # Lua puts dropout after each conv; no module at all when off
                self.drop1 = nn.Dropout(drop_rate)
            self.norm2 = nn.BatchNorm2d(inter)
            self.relu2 = nn.ReLU()
            self.conv2 = nn.Conv2d(inter, growth_rate, 3, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, growth_rate, 3, padding=1, bias=False)
        if drop_rate > 0:
            self.drop2 = nn.Dropout(drop_rate)

    def _front(self, *features: Tensor) -> Tensor:
        return self.conv1(self.relu1(self.norm1(self.cat(*features))))

    def forward(self, *features: Tensor) -> Tensor:
        if self.memory_efficient and self.training and any(f.requires_grad for f in features):
            return self._forward_checkpointed(*features)
        out = self._front(*features)
        if self.bottleneck:
            out = self._drop(1, out)
            out = self.conv2(self.relu2(self.norm2(out)))
        return self._drop(2, out)

    def _drop(self, i: int, x: Tensor) -> Tensor:
        drop = getattr(self, f"drop{i}", None)
        return x if drop is None else drop(x)

    # -- memory-efficient path -------------------------------------------------------------------------
    # The checkpoint toggle lives here and only here. Two regions, each ending in a conv: cat+BN+ReLU+conv1
    # and [dropout+]BN+ReLU+conv2. Non-reentrant checkpoint stops recomputing a region once its last saved
    # tensor is back (torch's default early stop), and a conv saves its input before it runs, so backward
    # re-runs cat+BN+ReLU and BN+ReLU but never a conv. Between forward and backward a layer with C input
    # channels then keeps its 1x1 output (bn_size*k channels) and its k new features (its successors' input),
    # where the plain layer keeps the cat (C), the ReLU output (C), the 1x1 output and the BN-ReLU output
    # (bn_size*k each): BC-100's last block-1 layer, 60 channels instead of 504 a pixel. Backward holds one
    # layer's recompute at a time (cat and ReLU output, C each, and their gradients). The dropout mask is
    # redrawn identically (checkpoint restores the RNG state). Backward runs the forward's own autograd nodes
    # (the training-mode BN backward, through the batch statistics); the recompute only refills what they
    # saved. So its BN need not reduce the batch again: each region keeps its forward BN's batch mean and 1/std
    # (C numbers each, _SaveBatchStats) and the recompute's BN returns them with the output as their affine map
    # (_ReuseBatchStats), one pass over C channels where a training BN makes three, to the bit the forward's
    # output (_affine_from_stats), so every ReLU decides as in the forward. It does not touch the running
    # statistics, but the module still counts the batch (and a BN recomputed in full, off the CPU kernels,
    # would update them again), so the recompute runs with them frozen.
    def _forward_checkpointed(self, *features: Tensor) -> Tensor:
        out = cp.checkpoint(partial(self._front_once, []), *features, use_reentrant=False)
        if self.bottleneck:  # RNG kept: same dropout mask
            out = cp.checkpoint(partial(self._back_once, []), out, use_reentrant=False)
        return self._drop(2, out)

    def _front_once(self, stats: list, *features: Tensor) -> Tensor:
        return self.conv1(_bn_relu_once(self.norm1, self.relu1, stats, self.cat(*features)))

    def _back_once(self, stats: list, x: Tensor) -> Tensor:
        return self.conv2(_bn_relu_once(self.norm2, self.relu2, stats, self._drop(1, x)))


def _bn_relu_once(bn: nn.BatchNorm2d, relu: nn.ReLU, stats: list, x: Tensor) -> Tensor:
    """``relu(bn(x))`` in a checkpointed region. In the forward, ``bn`` keeps its batch statistics in ``stats``;
    as the recompute, it runs from them with its running statistics and counter frozen, and ``relu`` then
    works in place on the output the recompute made itself (a BN saves its input, not its output, so nothing
    else reads it), one C-channel tensor fewer to allocate."""
    if not (torch.is_grad_enabled() and in_backward()):
        with _SaveBatchStats(stats):
            x = bn(x)
        return relu(x)
    reuse = _ReuseBatchStats(stats)
    with _frozen_bn_stats(bn), reuse:
        x = bn(x)
    if not reuse.reused:  # a BN recomputed in full: its output is the module's own, left alone
        return relu(x)
    inplace = relu.inplace
    relu.inplace = True
    try:
        return relu(x)
    finally:
        relu.inplace = inplace


class _frozen_bn_stats:
    """Keep a BatchNorm's running statistics and batch counter unchanged inside the block."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        self.bn = bn

    def __enter__(self) -> None:
        self.saved = {k: b.clone() for k, b in self.bn.named_buffers(recurse=False)}

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for k, b in self.bn.named_buffers(recurse=False):
                b.copy_(self.saved[k])


_BATCH_NORMS = frozenset({torch.ops.aten.native_batch_norm.default, torch.ops.aten._native_batch_norm_legit.default})


def _training_batch_norm(func: object, args: tuple, kwargs: dict | None) -> dict | None:
    """A training-mode BatchNorm call's arguments by name (input, weight, bias, ..., eps); None for any other."""
    if func not in _BATCH_NORMS:
        return None
    named = dict(zip((a.name for a in func._schema.arguments), args), **(kwargs or {}))  # type: ignore[attr-defined]
    return named if named["training"] else None


def _affine_from_stats(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor) -> Tensor:
    """The CPU training kernel's output from its own statistics, to the bit: x*alpha + beta, alpha = invstd*weight,
    beta = bias - mean*alpha, each ``+`` a fused multiply-add as the kernel's vector loop compiles
    (ATen cpu/batch_norm_kernel.cpp); ``addcmul`` with value +-1 is that fused multiply-add."""
    alpha = invstd if weight is None else invstd * weight
    beta = torch.addcmul(torch.zeros_like(mean) if bias is None else bias, mean, alpha, value=-1)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(beta.view(shape), x, alpha.view(shape))


def _reusable(bn: dict) -> bool:
    """Where :func:`_affine_from_stats` is the kernel's formula: the CPU float kernels, parameters of the input's
    dtype (a mixed-precision or GPU BatchNorm is recomputed in full; correct, only slower)."""
    x = bn["input"]
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and all(bn[k] is None or bn[k].dtype == x.dtype for k in ("weight", "bias")))


class _SaveBatchStats(TorchDispatchMode):
    """A checkpointed region's forward: keeps each training BatchNorm's batch mean and 1/std (C numbers each)."""

    def __init__(self, stats: list[tuple[Tensor, Tensor] | None]) -> None:
        super().__init__()
        self.stats = stats

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        bn = _training_batch_norm(func, args, kwargs)
        if bn is not None:
            self.stats.append((out[1], out[2]) if _reusable(bn) else None)
        return out


class _ReuseBatchStats(TorchDispatchMode):
    """The region's recompute: each training BatchNorm returns the forward's statistics and the output they
    define, with no batch reduction and no running-statistics update (a new one per recompute: a second
    backward, ``retain_graph``, recomputes alike)."""

    def __init__(self, stats: list[tuple[Tensor, Tensor] | None]) -> None:
        super().__init__()
        self.stats = stats
        self.next = 0
        self.reused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        bn = _training_batch_norm(func, args, kwargs)
        if bn is None:
            return func(*args, **(kwargs or {}))
        stats = self.stats[self.next] if self.next < len(self.stats) else None
        self.next += 1
        if stats is None:
            return func(*args, **(kwargs or {}))
        mean, invstd = stats
        self.reused = True
        return _affine_from_stats(bn["input"], bn["weight"], bn["bias"], mean, invstd), mean, invstd


class _DenseBlock(nn.Module):
    def __init__(
        self, num_layers: int, in_channels: int, growth_rate: int, bottleneck: bool, bn_size: int,
        drop_rate: float, memory_efficient: bool,
    ) -> None:
        super().__init__()
        width = len(str(num_layers))
        self.names = [f"layer{i + 1:0{max(width, 2)}d}" for i in range(num_layers)]
        for i, name in enumerate(self.names):
            layer = _DenseLayer(
                in_channels + i * growth_rate, growth_rate, bottleneck, bn_size, drop_rate, memory_efficient
            )
            self.add_module(name, layer)
        self.cat = Concat()
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for name in self.names:
            features.append(getattr(self, name)(*features))
        return self.cat(*features)


class _Transition(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class _Head(nn.Sequential):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)  # 8x8 on 32x32 inputs, as in the seed
        self.flatten = nn.Flatten(1)  # keeps the batch dim at N=1 (the seed's squeeze did not)
        self.fc = nn.Linear(in_channels, num_classes)


class DenseNet(nn.Module):
    """DenseNet(-BC) for CIFAR-sized inputs. Returns logits (use cross-entropy).

    Args:
        depth: total depth L; each of the three blocks has (L-4)/3 layers, halved with ``bottleneck``.
        growth_rate: k.
        bottleneck: BC's 1x1 conv to ``bn_size * k`` before each 3x3 conv.
        compression: theta; transitions output floor(theta * C) channels.
        num_init_features: stem width; default 2k for BC, 16 for plain DenseNet (the paper's choice).
        memory_efficient: in training, recompute cat+BN+ReLU and BN+ReLU in backward (two
            ``torch.utils.checkpoint`` regions per layer; no conv is recomputed; each BN from its forward's
            batch statistics, with no batch reduction); same math, bit for bit on the CPU.
    """

    def __init__(
        self, depth: int = 100, growth_rate: int = 12, bottleneck: bool = True, compression: float = 0.5,
        num_classes: int = 10, bn_size: int = 4, num_init_features: int | None = None, drop_rate: float = 0.0,
        memory_efficient: bool = False, in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 3 or depth < 7:
            raise ValueError(f"depth must be 3n+4 with n >= 1, got {depth}")
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        n = (depth - 4) // 3
        if bottleneck:
            if n % 2:
                raise ValueError(f"DenseNet-BC depth must be 6n+4, got {depth}")
            n //= 2
        channels = num_init_features or (2 * growth_rate if bottleneck else 16)
        self.config = dict(
            depth=depth, growth_rate=growth_rate, bottleneck=bottleneck, compression=compression,
            num_classes=num_classes, bn_size=bn_size, num_init_features=channels, drop_rate=drop_rate,
            memory_efficient=memory_efficient, in_channels=in_channels,
        )
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        for b in (1, 2, 3):
            block = _DenseBlock(n, channels, growth_rate, bottleneck, bn_size, drop_rate, memory_efficient)
            self.add_module(f"block{b}", block)
            channels = block.out_channels
            if b < 3:
                out = int(math.floor(channels * compression))
                self.add_module(f"trans{b}", _Transition(channels, out))
                channels = out
        self.head = _Head(channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The seed's and Lua's init: conv N(0, sqrt(2/(k*k*out))) (fan-out), BN 1/0, linear bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.trans1(self.block1(x))
        x = self.trans2(self.block2(x))
        return self.head(self.block3(x))
