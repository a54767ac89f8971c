"""Seeded inputs and labels for a model: what every verb feeds the model it checks."""

from __future__ import annotations

import torch


def make_batch(model: torch.nn.Module, input_shape: tuple[int, ...], batch: int, seed: int,
               num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded inputs and labels; the class count is the model's output width unless given."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *input_shape, generator=g)
    if num_classes is None:
        was = model.training
        model.eval()
        with torch.no_grad():
            num_classes = int(model(x[:1]).shape[1])
        model.train(was)
    return x, torch.randint(0, num_classes, (batch,), generator=g)
