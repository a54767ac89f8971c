"""The one float64 copy of a model, for every oracle (the verdict's, gradcheck's and the CLI's), and the one
mode every judged copy runs in."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["calls_dropout", "dropout_off", "dropout_off_for", "fp64_copy", "judging_mode"]


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
    """``model`` in train (or eval) mode with every dropout module off: dropout draws differ between dtypes, and
    its randomness is no backend property (a dropout written as a call in ``forward``: :func:`dropout_off`)."""
    model.train(not eval_mode)
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    return model


# Every dropout a forward can call, functional or not (``nn.Dropout*`` modules call the functional ones).
_DROPOUTS = frozenset(f for f in (
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.dropout, getattr(torch, "dropout_", None), torch.alpha_dropout, getattr(torch, "alpha_dropout_", None),
    torch.feature_dropout, getattr(torch, "feature_dropout_", None), torch.feature_alpha_dropout,
    getattr(torch, "feature_alpha_dropout_", None)) if f is not None)
# A call of one of them in source code (``F.dropout(``, ``torch.dropout(``, ``dropout2d(`` ...): not ``nn.Dropout(``.
_CALL = re.compile(r"(?<![\w])(?:feature_alpha_|alpha_|feature_)?dropout(?:[123]d)?_?\s*\(")


class _DropoutOff(TorchFunctionMode):
    """Each dropout call returns its input, as in eval mode (``F.dropout(x, p, training=False)`` is ``x``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in _DROPOUTS:
            return args[0] if args else kwargs["input"]
        return func(*args, **kwargs)


@functools.cache
def _may_call_dropout(cls: type) -> bool:
    """Whether a module class's code can call a dropout function. A user's class by its whole file (a helper
    beside the class, ``F.dropout(`` or ``torch.dropout(``, not ``nn.Dropout(``); one of torch's by any mention
    of dropout in its own source (an attention's ``dropout_p`` reaches a functional dropout); a class whose
    source cannot be read (a notebook's) may. Dropout modules themselves are ``judging_mode``'s."""
    if issubclass(cls, nn.modules.dropout._DropoutNd):
        return False
    try:
        if cls.__module__.split(".")[0] == "torch":
            return "dropout" in inspect.getsource(cls).lower()
        with open(_source_file(cls), encoding="utf-8", errors="replace") as f:
            return _CALL.search(f.read()) is not None
    except (OSError, TypeError):
        return True


def _source_file(cls: type) -> str:
    """The file a class was written in; also for a module loaded from a path and not registered in
    ``sys.modules`` (a ``--model file.py:factory``), through its methods' code objects."""
    try:
        return inspect.getsourcefile(cls) or ""
    except TypeError:
        for value in vars(cls).values():
            code = getattr(value, "__code__", None)
            if code is not None:
                return code.co_filename
        raise


def calls_dropout(model: nn.Module) -> bool:
    """Whether ``model``'s code can call a dropout function itself (:func:`_may_call_dropout` of each class)."""
    return any(_may_call_dropout(type(m)) for m in model.modules())


def dropout_off(model: nn.Module | None = None) -> contextlib.AbstractContextManager:
    """Every dropout off while judging, also one written as a call in a ``forward``
    (``F.dropout(x, p, self.training)``, torchvision's ``_DenseLayer`` with ``drop_rate > 0``), which
    :func:`judging_mode` cannot reach through the module's mode: its draws differ between dtypes, and a
    replay of the unit that calls it would draw anew (a false alarm of that unit on every correct backend).

    A Python mode costs every torch call made while it is on (about 15 % of a whole diff of BC-100 at batch 4:
    19.6 against 17.2 CPU seconds, three runs each), so given a ``model`` it is entered only when that model's
    code can call a dropout (:func:`calls_dropout`).
    The training verbs never enter it."""
    if model is not None and not calls_dropout(model):
        return contextlib.nullcontext()
    return _DropoutOff()


def dropout_off_for(fn: Callable) -> Callable:
    """Decorator: ``fn(model, ...)`` runs under :func:`dropout_off` of its first argument."""

    @functools.wraps(fn)
    def run(model: nn.Module, *args: object, **kwargs: object) -> object:
        with dropout_off(model):
            return fn(model, *args, **kwargs)

    return run
