"""Model builders by name, and loading of user models from ``file.py:factory`` or ``pkg.mod:factory``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from torch import nn

from densenet_debug.errors import UsageError
from densenet_debug.models.densenet import Concat, DenseNet

__all__ = ["BUILDERS", "Concat", "DenseNet", "build_model", "resolve_model"]

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
        model = factory(num_classes=num_classes) if num_classes is not None else factory()
    except Exception as exc:  # user code: report it in one line
        raise UsageError(f"{where}:{factory_name}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"{where}:{factory_name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_file(path: str) -> object:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"model file not found: {path}")
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
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UsageError(f"cannot import module {name!r}: {exc}") from exc
    except Exception as exc:
        raise UsageError(f"importing {name} failed: {type(exc).__name__}: {exc}") from exc
