"""Small models written the way users write them, for the capture and tracer tests.

Each style takes ``inplace`` so a test can build the out-of-place twin with the same weights (same seed) and
take reference gradients from plain ``torch.autograd.grad`` on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn


class TorchvisionLayer(nn.Module):
    """torchvision's _DenseLayer: nn.ReLU(inplace=True), cat of a feature list, optional checkpointed bottleneck."""

    def __init__(self, c: int, k: int, inplace: bool, efficient: bool) -> None:
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(c), nn.ReLU(inplace=inplace)
        self.conv1 = nn.Conv2d(c, 2 * k, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(2 * k), nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(2 * k, k, 3, padding=1, bias=False)
        self.efficient = efficient

    def bottleneck(self, *features: Tensor) -> Tensor:
        return self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))

    def forward(self, *features: Tensor) -> Tensor:
        if self.efficient and any(f.requires_grad for f in features):
            out = cp.checkpoint(self.bottleneck, *features, use_reentrant=False)
        else:
            out = self.bottleneck(*features)
        return self.conv2(self.relu2(self.norm2(out)))


class TorchvisionStyle(nn.Module):
    def __init__(self, k: int = 3, n: int = 3, classes: int = 5, inplace: bool = True,
                 efficient: bool = False) -> None:
        super().__init__()
        c = 2 * k
        self.inplace = inplace
        self.conv0 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.layers = nn.ModuleList()
        for _ in range(n):
            self.layers.append(TorchvisionLayer(c, k, inplace, efficient))
            c += k
        self.norm, self.classifier = nn.BatchNorm2d(c), nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        features = [self.conv0(x)]
        for layer in self.layers:
            features.append(layer(*features))
        out = F.relu(self.norm(torch.cat(features, 1)), inplace=self.inplace)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class FunctionalLayer(nn.Module):
    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, 2 * k, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(2 * k), nn.Conv2d(2 * k, k, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat((x, out), 1)


class FunctionalStyle(nn.Module):
    """The research-code style: F.relu and torch.cat((x, out), 1) in forward, squeeze, log_softmax."""

    def __init__(self, k: int = 3, n: int = 3, classes: int = 5) -> None:
        super().__init__()
        c = 2 * k
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        layers = []
        for _ in range(n):
            layers.append(FunctionalLayer(c, k))
            c += k
        self.dense = nn.Sequential(*layers)
        self.bn, self.fc = nn.BatchNorm2d(c), nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.dense(self.stem(x))
        out = torch.squeeze(F.avg_pool2d(F.relu(self.bn(out)), out.shape[-1]))
        return F.log_softmax(self.fc(out), dim=-1)


class TwiceStyle(nn.Module):
    """One conv module called twice in a forward (weights shared between the calls)."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, classes)

    def forward(self, x: Tensor) -> Tensor:
        a = self.act(self.shared(self.stem(x)))
        b = self.act(self.shared(a))
        return self.fc((a + b).mean((2, 3)))


class CatFn(torch.autograd.Function):
    """A hand-written cat along channels whose backward slices the gradient."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:  # noqa: ANN001
        ctx.split = a.shape[1]
        return torch.cat((a, b), 1)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        return g[:, :ctx.split], g[:, ctx.split:]


class CatFnStyle(nn.Module):
    """Dense connectivity through a custom autograd.Function cat."""

    def __init__(self, k: int = 3, n: int = 2, classes: int = 5) -> None:
        super().__init__()
        c = 2 * k
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.convs = nn.ModuleList()
        for _ in range(n):
            self.convs.append(nn.Conv2d(c, k, 3, padding=1, bias=False))
            c += k
        self.fc = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.stem(x)
        for conv in self.convs:
            out = CatFn.apply(out, conv(F.relu(out)))
        return self.fc(out.mean((2, 3)))


def build(style: str, seed: int = 0, **kwargs: object) -> nn.Module:
    torch.manual_seed(seed)
    models = {"torchvision": TorchvisionStyle, "functional": FunctionalStyle, "twice": TwiceStyle,
              "catfn": CatFnStyle}
    return models[style](**kwargs)


def batch(n: int = 3, seed: int = 0, classes: int = 5, size: int = 8) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)
