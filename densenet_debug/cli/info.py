"""``densenet-debug info``: the model's blocks, parameters and activation memory."""

from __future__ import annotations

import argparse

from rich.table import Table

from densenet_debug.cli._common import add_model_args, add_threads_arg, load_model, positive_int
from densenet_debug.models.info import summarize
from densenet_debug.table import make_console, print_table

HELP = "summarize a model: blocks, layers, parameters, activation memory at a batch size"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--batch", type=positive_int, default=64,
                        help="batch size for the activation-memory estimate (default 64)")
    add_threads_arg(parser)


def run(args: argparse.Namespace) -> int:
    model = load_model(args)
    s = summarize(model, args.input_shape, args.batch)
    table = Table(title=f"{args.model}  (input {','.join(map(str, args.input_shape))})")
    for col in ("module", "kind", "units", "parameters", "output shape"):
        table.add_column(col, justify="right" if col in ("units", "parameters") else "left")
    for r in s.rows:
        table.add_row(r.name, r.kind, str(r.units), f"{r.params:,}", "x".join(map(str, r.output_shape[1:])))
    table.add_section()
    table.add_row("total", "", str(sum(r.units for r in s.rows)), f"{s.total_params:,}", "")
    console = make_console()
    print_table(table, console)
    console.print(f"parameters: {s.total_params:,} ({s.param_bytes / 2**20:.1f} MiB fp32)")
    console.print(f"activation memory for backward at batch {s.batch}: {s.activation_bytes / 2**20:.0f} MiB "
                  "(fp32, measured from autograd's saved tensors)")
    return 0
