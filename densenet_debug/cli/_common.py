"""Options shared by several verbs: model choice, input shape, device, seed, threads, output paths."""

from __future__ import annotations

import argparse

from torch import nn

from densenet_debug.backends import resolve_device  # noqa: F401 - re-exported for the verbs
from densenet_debug.errors import UsageError
from densenet_debug.models import DEFAULT_MODEL, load_checked_model


def add_model_args(parser: argparse.ArgumentParser, batch: int | None = None) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"builder name, path/to/file.py:factory or package.module:factory "
                             f"(default {DEFAULT_MODEL})")
    parser.add_argument("--input-shape", default="3,32,32", type=input_shape, metavar="C,H,W",
                        help="shape of one input sample (default 3,32,32)")
    parser.add_argument("--num-classes", type=positive_int, default=None,
                        help="classes of the model's output (default: the model's output width)")
    if batch is not None:
        parser.add_argument("--batch", type=positive_int, default=batch, help=f"batch size (default {batch})")


def add_threads_arg(parser: argparse.ArgumentParser, default: int | None = None) -> None:
    parser.add_argument("--threads", type=positive_int, default=default,
                        help="torch CPU threads (default: " + ("torch's choice" if default is None else str(default))
                             + "; on a busy shared machine 1 is often much faster: small ops)")


def add_quiet_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (it is drawn on stderr only when that is a terminal)")


def add_seed_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, inputs and labels (default 0)")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when present, else cpu)")


def input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 3,32,32, got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return shape


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def load_model(args: argparse.Namespace, **kwargs: object) -> nn.Module:
    """The model ``--model``/``--num-classes`` name, checked to map ``--input-shape`` to (batch, classes)."""
    return load_checked_model(args.model, tuple(args.input_shape), num_classes=args.num_classes, **kwargs)


def require_parameters(model: nn.Module, spec: str, why: str = "there are no parameter gradients to check") -> None:
    """A model without parameters is bad input for verbs that check (or draw) parameter gradients."""
    if not any(True for _ in model.parameters()):
        raise UsageError(f"model {spec} has no parameters: {why}")


def check_batch_fits(batch: int, shape: tuple[int, ...], what: str = "--batch") -> None:
    """Refuse a batch whose input tensor alone exceeds the machine's memory, before allocating anything."""
    import math
    import os

    need = batch * math.prod(shape) * 8  # float64, the widest copy a verb makes of the input
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > total:
        raise UsageError(f"{what} {batch} with --input-shape {','.join(map(str, shape))} needs "
                         f"{need / 2**30:.0f} GiB for the input alone (this machine has {total / 2**30:.0f} GiB); "
                         f"try a smaller --batch or --input-shape")


def check_outputs(args: argparse.Namespace, **flags: tuple[str, ...] | None) -> None:
    """Validate every output path flag (``name=suffixes``) before any work starts (see atomic.check_output)."""
    from densenet_debug.atomic import check_output

    for name, suffixes in flags.items():
        check_output(getattr(args, name, None), "--" + name.replace("_", "-"), suffixes)
