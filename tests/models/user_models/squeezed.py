"""The smallest model that squeezes its output and returns log-probabilities (batch 1 gives shape (classes,))."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Squeezed(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.conv(x)))
        out = torch.squeeze(F.adaptive_avg_pool2d(out, 1))
        return F.log_softmax(self.fc(out), dim=1 if out.dim() == 2 else 0)


def squeezed(num_classes=10):
    torch.manual_seed(0)
    return Squeezed(num_classes)
