"""Model builders by name, and loading of user models from ``file.py:factory`` or ``pkg.mod:factory``.

A user's model loads the way Python runs the user's own code: a model file's directory goes on ``sys.path``
(as for ``python file.py``), so it can import the modules beside it; a ``module:factory`` spec is looked up
from the current directory too (as for ``python -m``). A factory is called with ``num_classes=`` only when
it has such a parameter; otherwise with no arguments, and the class count is then checked against the
model's output width (:func:`load_checked_model`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from densenet_debug.errors import UsageError
from densenet_debug.models.batch import output_classes
from densenet_debug.models.densenet import Concat, DenseNet

__all__ = ["BUILDERS", "Concat", "DenseNet", "build_model", "load_checked_model", "resolve_model",
           "takes_num_classes"]

DEFAULT_MODEL = "densenet-bc-100"

# Paper names: L = depth, k = growth rate. densenet-bc-40 is not in the paper; it is our small one.
BUILDERS: dict[str, Callable[..., DenseNet]] = {
    "densenet-bc-100": partial(DenseNet, depth=100, growth_rate=12, bottleneck=True),
    "densenet-bc-250": partial(DenseNet, depth=250, growth_rate=24, bottleneck=True),
    "densenet-bc-190": partial(DenseNet, depth=190, growth_rate=40, bottleneck=True),
    "densenet-40": partial(DenseNet, depth=40, growth_rate=12, bottleneck=False, compression=1.0),
    "densenet-bc-40": partial(DenseNet, depth=40, growth_rate=12, bottleneck=True),
    # Tiny configurations for tests and self-tests: same code path, seconds instead of minutes.
    "densenet-bc-16": partial(DenseNet, depth=16, growth_rate=4, bottleneck=True),
    "densenet-bc-10": partial(DenseNet, depth=10, growth_rate=4, bottleneck=True, bn_size=2),
}


def build_model(name: str = DEFAULT_MODEL, **kwargs: object) -> DenseNet:
    """Build a named DenseNet configuration; keyword arguments override the builder's (``num_classes=100``)."""
    if name not in BUILDERS:
        raise UsageError(f"unknown model {name!r}; known models: {', '.join(BUILDERS)} (or file.py:factory)")
    return BUILDERS[name](**kwargs)


def resolve_model(spec: str, num_classes: int | None = None, **kwargs: object) -> nn.Module:
    """Return an ``nn.Module`` for a builder name, ``path/to/file.py:factory`` or ``package.module:factory``.

    Every failure a user can cause raises :class:`UsageError` with a one-line message.
    """
    if spec in BUILDERS:
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return build_model(spec, **kwargs)
    if ":" not in spec:
        raise UsageError(
            f"unknown model {spec!r}; known models: {', '.join(BUILDERS)}; or give file.py:factory "
            "or package.module:factory"
        )
    where, _, factory_name = spec.rpartition(":")
    if not factory_name.isidentifier():
        raise UsageError(f"bad model spec {spec!r}: {factory_name!r} is not a factory name")
    module = _import_file(where) if where.endswith(".py") or "/" in where else _import_module(where)
    factory = getattr(module, factory_name, None)
    if factory is None:
        raise UsageError(f"{where} has no attribute {factory_name!r}")
    if not callable(factory):
        raise UsageError(f"{where}:{factory_name} is not callable")
    try:
        model = factory(num_classes=num_classes) if num_classes is not None and takes_num_classes(factory) \
            else factory()
    except Exception as exc:  # user code: report it in one line
        raise UsageError(f"{where}:{factory_name}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"{where}:{factory_name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def takes_num_classes(factory: Callable[..., object]) -> bool:
    """Whether ``factory`` accepts a ``num_classes=`` keyword (by name or through ``**kwargs``).

    A callable whose signature cannot be read (some C extensions) is assumed to take it, as before.
    """
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name == "num_classes" and p.kind is not p.POSITIONAL_ONLY
                                           and p.kind is not p.VAR_POSITIONAL) for p in params)


def load_checked_model(spec: str, input_shape: tuple[int, ...], num_classes: int | None = None,
                       **kwargs: object) -> nn.Module:
    """:func:`resolve_model`, then checked to map a batch of two ``input_shape`` samples to (2, classes).

    The probe batch is 2, never 1: a model that squeezes its output (``torch.squeeze`` after the pool, as
    research code often does) drops the batch dimension at batch 1. With ``num_classes`` given, the output
    width must equal it (a factory without a ``num_classes`` parameter builds its own head).
    """
    model = resolve_model(spec, num_classes=num_classes, **kwargs)
    width = output_classes(model, torch.zeros(2, *input_shape), spec)
    if num_classes is not None and width != num_classes:
        raise UsageError(f"model {spec} returns {width} classes, not --num-classes {num_classes}")
    return model


def _import_file(path: str) -> object:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"model file not found: {path}")
    _on_path(str(file.resolve().parent))  # as `python file.py` does: its siblings import
    name = f"_densenet_debug_user_{abs(hash(str(file.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # user code: report it in one line
        del sys.modules[name]
        raise UsageError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _import_module(name: str) -> object:
    if "" not in sys.path:
        _on_path(os.getcwd())  # as `python -m` does; the console script's sys.path[0] is its bin directory
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UsageError(f"cannot import module {name!r}: {exc}") from exc
    except Exception as exc:
        raise UsageError(f"importing {name} failed: {type(exc).__name__}: {exc}") from exc


def _on_path(directory: str) -> None:
    if directory not in sys.path:
        sys.path.insert(0, directory)
