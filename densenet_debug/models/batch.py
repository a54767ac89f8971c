"""Seeded inputs and labels for a model: what every verb feeds the model it checks.

The class count is the model's output width on a batch of two, never one: research code often squeezes the
pooled features (``torch.squeeze(F.avg_pool2d(out, 8))``), which drops the batch dimension at batch 1 and
leaves ``(classes,)``. At batch >= 2 such a model is fine; at batch 1 it cannot be trained or compared as
written, and that is a one-line :class:`UsageError`, not an ``IndexError`` deep inside a verb.
Log-probabilities are fine as outputs: cross-entropy of ``log_softmax`` outputs is their NLL loss.
"""

from __future__ import annotations

import torch
from torch import nn

from densenet_debug.errors import UsageError


def make_batch(model: nn.Module, input_shape: tuple[int, ...], batch: int, seed: int,
               num_classes: int | None = None, spec: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded inputs ``randn(batch, *input_shape)`` and labels ``randint(0, classes, (batch,))``, drawn in
    that order from one ``torch.Generator`` seeded with ``seed``.

    ``classes`` is ``num_classes`` when given, else the model's output width on a batch of two. At batch 1
    the model must return ``(1, classes)``. The probes run in eval mode without grad (no BN statistics move);
    the tensors come back on the CPU.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *input_shape, generator=g)
    classes = num_classes if num_classes is not None else output_classes(model, torch.cat([x, x])[:2], spec)
    if batch == 1:
        check_batch_of_one(model, x, classes, spec)
    return x, torch.randint(0, classes, (batch,), generator=g)


def output_classes(model: nn.Module, probe: torch.Tensor, spec: str = "") -> int:
    """The output width of ``model`` on ``probe`` (a batch of >= 2), which must come back ``(batch, classes)``."""
    if probe.shape[0] < 2:
        raise ValueError("the class-count probe needs a batch of at least 2 (a squeeze drops a batch of 1)")
    try:
        out = _eval_forward(model, probe)
    except Exception as exc:  # user model vs user shape: say so in one line
        raise UsageError(f"{_who(spec)} does not accept inputs of shape "
                         f"{','.join(map(str, probe.shape[1:]))}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != probe.shape[0]:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"{_who(spec)} must return logits or log-probabilities of shape (batch, classes); "
                         f"for a batch of {probe.shape[0]} it returned {got}")
    return int(out.shape[1])


def check_batch_of_one(model: nn.Module, x: torch.Tensor, classes: int, spec: str = "") -> None:
    """A batch of one must come back ``(1, classes)``; a squeezed output does not, and cannot be judged."""
    try:
        out = _eval_forward(model, x[:1])
    except Exception as exc:  # user code at batch 1: one line
        raise UsageError(f"{_who(spec)} fails on a batch of 1 ({type(exc).__name__}: {exc}); "
                         "use --batch 2 or more") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, classes):
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"{_who(spec)} returns {got} for a batch of 1, not (1, {classes}) (a squeeze drops "
                         "the batch dimension?); use --batch 2 or more")


def _eval_forward(model: nn.Module, x: torch.Tensor) -> object:
    param = next(model.parameters(), None)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x if param is None else x.to(param.device))
    finally:
        model.train(was)


def _who(spec: str) -> str:
    return f"model {spec}" if spec else "the model"
