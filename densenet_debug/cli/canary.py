"""``densenet-debug canary``: a model that converges, the 2017 bug that silently stops it, and the layer."""

from __future__ import annotations

import argparse
import json

from densenet_debug.atomic import write_text
from densenet_debug.cli._common import add_quiet_arg, add_seed_arg, add_threads_arg, check_outputs, positive_int
from densenet_debug.errors import UsageError
from densenet_debug.models import BUILDERS
from densenet_debug.table import make_console

HELP = ("train a small DenseNet-BC on scikit-learn's digits clean and with pytorch#708 planted; show the "
        "faulty run fails to converge and diff names the layer")
EXIT_CODES = {0: "all three facts hold", 1: "one does not"}
FIGURE_SUFFIXES = (".png", ".svg", ".pdf")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="canary.png", metavar="PATH",
                        help="where to write both loss curves; the format follows the extension: "
                             + ", ".join(FIGURE_SUFFIXES) + " (default canary.png)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the numbers as JSON here")
    parser.add_argument("--model", default="densenet-bc-10", choices=sorted(BUILDERS), metavar="NAME",
                        help="model to train (default densenet-bc-10: one dense layer per block, so #708 hits "
                             "every dense layer, as it did in the seed)")
    parser.add_argument("--epochs", type=positive_int, default=15, help="epochs per run (default 15)")
    parser.add_argument("--batch", type=positive_int, default=64, help="batch size (default 64)")
    parser.add_argument("--lr", type=_positive_float, default=0.2, help="peak learning rate, cosine (default 0.2)")
    parser.add_argument("--target", type=_fraction, default=0.8,
                        help="the stated test accuracy the clean run must reach and the faulty one must not "
                             "(default 0.8: measured on ten seeds, clean runs stay above it, faulty below)")
    add_threads_arg(parser, default=1)
    add_quiet_arg(parser)
    add_seed_arg(parser)


def run(args: argparse.Namespace) -> int:
    from densenet_debug.faults.canary import CANARY_FAULT, run_canary, save_figure

    check_outputs(args, out=FIGURE_SUFFIXES, json=None)
    if args.batch < 2:
        raise UsageError("--batch must be >= 2: pytorch#708 is invisible at batch 1")
    console = make_console()
    console.print(f"training {args.model} on digits (32x32) for {args.epochs} epochs, clean and with "
                  f"{CANARY_FAULT} ...")
    report = run_canary(model=args.model, epochs=args.epochs, batch_size=args.batch, lr=args.lr, seed=args.seed,
                        target=args.target, threads=args.threads)
    save_figure(report, args.out)
    for i, fact in enumerate(report.facts(), 1):
        console.print(f"{i}. {fact}", highlight=False)
    console.print(f"loss curves: {args.out}; total {report.seconds:.1f} s; "
                  f"{'[green]canary holds[/green]' if report.passed else '[red]canary FAILED[/red]'}")
    if args.json:
        write_text(args.json, json.dumps(report.to_json(), indent=1) + "\n")
    return 0 if report.passed else 1
