"""A DenseNet written the way the 2017 seed wrote it, at a small depth: the loading paths meet it as a user file.

Research-code style on purpose: camelCase constructor arguments, ``F.relu`` and ``torch.cat((x, out), 1)``
inside ``forward``, ``torch.squeeze`` after the pool (a batch of 1 loses its batch dimension) and
log-probabilities out. No ``num_classes`` anywhere; the factories wrap the constructor as a user would.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
    def __init__(self, nChannels, growthRate):
        super().__init__()
        interChannels = 4 * growthRate
        self.bn1 = nn.BatchNorm2d(nChannels)
        self.conv1 = nn.Conv2d(nChannels, interChannels, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(interChannels)
        self.conv2 = nn.Conv2d(interChannels, growthRate, kernel_size=3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat((x, out), 1)


class Transition(nn.Module):
    def __init__(self, nChannels, nOutChannels):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(nChannels)
        self.conv1 = nn.Conv2d(nChannels, nOutChannels, kernel_size=1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv1(F.relu(self.bn1(x))), 2)


class DenseNet(nn.Module):
    def __init__(self, growthRate, depth, reduction, nClasses, bottleneck):
        super().__init__()
        assert bottleneck, "this copy keeps only the bottleneck variant"
        nDenseBlocks = (depth - 4) // 6
        nChannels = 2 * growthRate
        self.conv1 = nn.Conv2d(3, nChannels, kernel_size=3, padding=1, bias=False)
        self.dense1 = self._make_dense(nChannels, growthRate, nDenseBlocks)
        nChannels += nDenseBlocks * growthRate
        nOutChannels = int(math.floor(nChannels * reduction))
        self.trans1 = Transition(nChannels, nOutChannels)
        nChannels = nOutChannels
        self.dense2 = self._make_dense(nChannels, growthRate, nDenseBlocks)
        nChannels += nDenseBlocks * growthRate
        nOutChannels = int(math.floor(nChannels * reduction))
        self.trans2 = Transition(nChannels, nOutChannels)
        nChannels = nOutChannels
        self.dense3 = self._make_dense(nChannels, growthRate, nDenseBlocks)
        nChannels += nDenseBlocks * growthRate
        self.bn1 = nn.BatchNorm2d(nChannels)
        self.fc = nn.Linear(nChannels, nClasses)

    def _make_dense(self, nChannels, growthRate, nDenseBlocks):
        layers = []
        for _ in range(nDenseBlocks):
            layers.append(Bottleneck(nChannels, growthRate))
            nChannels += growthRate
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x)
        out = self.trans1(self.dense1(out))
        out = self.trans2(self.dense2(out))
        out = self.dense3(out)
        out = torch.squeeze(F.avg_pool2d(F.relu(self.bn1(out)), out.shape[-1]))
        return F.log_softmax(self.fc(out), dim=-1)


def small():
    """No num_classes parameter: the factory fixes the head, as the seed's training script did."""
    torch.manual_seed(0)
    return DenseNet(growthRate=4, depth=10, reduction=0.5, nClasses=10, bottleneck=True)


def small_classes(num_classes=10):
    torch.manual_seed(0)
    return DenseNet(growthRate=4, depth=10, reduction=0.5, nClasses=num_classes, bottleneck=True)


def bc100():
    """The seed's own configuration, exactly as its train.py builds it (its diff crashed at the class probe)."""
    torch.manual_seed(0)
    return DenseNet(growthRate=12, depth=100, reduction=0.5, nClasses=10, bottleneck=True)
