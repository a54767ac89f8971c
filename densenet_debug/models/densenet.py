"""DenseNet and DenseNet-BC for 32x32 inputs (Huang et al. 2017), faithful to the seed and the Lua code.

Every op lives in a named leaf module (the concatenations, ReLUs and pools included), so a fault can be
charged to a name such as ``block2.layer07.conv2``. ReLUs are not in-place, so every unit's output stays
what it produced (the committed fixtures record them so); in-place models of users trace as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.utils.checkpoint as cp
from torch import Tensor, nn

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
    # redrawn identically (checkpoint restores the RNG state). A BatchNorm under non-reentrant checkpoint
    # would update its running stats again on recompute, so the recompute runs with them frozen.
    def _forward_checkpointed(self, *features: Tensor) -> Tensor:
        out = cp.checkpoint(self._front_once, *features, use_reentrant=False)
        if self.bottleneck:
            out = cp.checkpoint(self._back_once, out, use_reentrant=False)  # RNG kept: same dropout mask
        return self._drop(2, out)

    def _back(self, x: Tensor) -> Tensor:
        return self.conv2(self.relu2(self.norm2(self._drop(1, x))))

    def _front_once(self, *features: Tensor) -> Tensor:
        return _once(self.norm1, self._front, *features)

    def _back_once(self, x: Tensor) -> Tensor:
        return _once(self.norm2, self._back, x)


def _once(bn: nn.BatchNorm2d, fn: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
    """``fn(*inputs)``, with ``bn``'s running statistics frozen when it runs as a checkpoint recompute."""
    if torch.is_grad_enabled() and in_backward():
        with _frozen_bn_stats(bn):
            return fn(*inputs)
    return fn(*inputs)


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
            ``torch.utils.checkpoint`` regions per layer; no conv is recomputed); same math.
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
