"""The one float64 copy of a model, for every oracle (the verdict's, gradcheck's and the CLI's), and the one
mode every judged copy runs in."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["fp64_copy", "judging_mode"]


def fp64_copy(model: nn.Module, device: str | torch.device | None = None) -> nn.Module:
    """A float64 copy of ``model`` (on ``device``, default: where it is) that shares nothing mutable with it.

    Modules of torch.nn and densenet_debug keep their state in their dicts, so they are copied
    structurally (new module objects, dicts and tensors; fast); any other module means deepcopy.
    Training mode is kept; the caller sets the mode it needs.
    """
    if not all(type(m).__module__.startswith(("torch.nn.", "densenet_debug.")) for m in model.modules()):
        return copy.deepcopy(model).to(device=device, dtype=torch.float64)
    memo: dict[int, object] = {}

    def tensor(t: Tensor) -> Tensor:
        dtype = torch.float64 if t.is_floating_point() else t.dtype
        return t.detach().to(device=device, dtype=dtype, copy=True)

    def module(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]  # type: ignore[return-value]
        c = copy.copy(m)
        memo[id(m)] = c
        for k, v in list(c.__dict__.items()):
            if isinstance(v, (dict, list, set)):
                c.__dict__[k] = copy.copy(v)
        for k, p in m._parameters.items():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(tensor(p), requires_grad=p.requires_grad)
            c._parameters[k] = None if p is None else memo[id(p)]  # type: ignore[assignment]
        for k, b in m._buffers.items():
            c._buffers[k] = None if b is None else tensor(b)
        for k, sub in m._modules.items():
            c._modules[k] = None if sub is None else module(sub)
        return c

    return module(model)


def judging_mode(model: nn.Module, eval_mode: bool) -> nn.Module:
    """``model`` in train (or eval) mode with every dropout off: dropout draws differ between dtypes, and its
    randomness is no backend property."""
    model.train(not eval_mode)
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    return model
