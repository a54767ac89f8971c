"""``densenet-debug plot WORKDIR``: redraw a training run's loss/error figure from its CSVs."""

from __future__ import annotations

import argparse

from densenet_debug.atomic import check_output
from densenet_debug.training.plot import FILENAME, SUFFIXES, plot_progress

HELP = "draw loss and error (train smoothed per epoch, test per epoch, log y) of a train work directory to a PNG"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workdir", help="a directory written by densenet-debug train (train.csv, test.csv)")
    parser.add_argument("--out", default=None,
                        help=f"image file, the format following the extension: {', '.join(SUFFIXES)} "
                             f"(default WORKDIR/{FILENAME})")


def run(args: argparse.Namespace) -> int:
    check_output(args.out, "--out", SUFFIXES)
    print(plot_progress(args.workdir, args.out))
    return 0
