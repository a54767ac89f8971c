"""``densenet-debug oracle``: PyTorch float64 against an independent NumPy float64 DenseNet, unit by unit."""

from __future__ import annotations

import argparse
import json

import torch
from rich.table import Table

from densenet_debug.atomic import write_text
from densenet_debug.cli._common import (
    add_device_arg,
    add_model_args,
    add_quiet_arg,
    add_seed_arg,
    add_threads_arg,
    check_outputs,
    load_model,
    resolve_device,
)
from densenet_debug.models.batch import make_batch
from densenet_debug.numpy_oracle import OracleReport, compare_with_torch
from densenet_debug.table import make_console, print_table

HELP = "compare PyTorch fp64 with an independent NumPy fp64 DenseNet, layer by layer (outputs and gradients)"
EXIT_CODES = {0: "PyTorch and NumPy agree", 1: "they disagree somewhere"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, batch=2)
    add_seed_arg(parser)
    add_device_arg(parser)
    parser.add_argument("--eval", action="store_true", help="BatchNorm with running statistics (default: train)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON (schema densenet-debug/oracle/1)")
    parser.add_argument("--all-rows", action="store_true", help="print every row, not only mismatches and the worst")
    add_threads_arg(parser)
    add_quiet_arg(parser)


def run(args: argparse.Namespace) -> int:
    check_outputs(args, json=None)
    torch.manual_seed(args.seed)
    model = load_model(args)
    device = resolve_device(args.device)
    model = model.to(device)
    x, y = make_batch(model, args.input_shape, args.batch, args.seed, args.num_classes, args.model)
    report = compare_with_torch(model, x.to(device), y.to(device), train=not args.eval)
    _print(report, args.all_rows)
    if args.json:
        write_text(args.json, json.dumps(report.to_json(), indent=2) + "\n")
    return 0 if report.verdict == "agree" else 1


def _print(report: OracleReport, all_rows: bool, worst: int = 12) -> None:
    console = make_console()
    rows = report.rows
    if not all_rows:
        bad = [r for r in rows if r.status == "mismatch"]
        rest = sorted((r for r in rows if r.status != "mismatch"), key=lambda r: r.ratio, reverse=True)
        rows = bad + rest[:max(0, worst - len(bad))]
    table = Table(title="PyTorch fp64 vs NumPy fp64, each unit on PyTorch's own inputs"
                  + ("" if all_rows else " (mismatches and closest rows)"))
    for col in ("layer", "pass", "quantity", "error", "tolerance", "err/tol", "status"):
        table.add_column(col, justify="right" if col in ("error", "tolerance", "err/tol") else "left",
                         overflow="fold" if col == "layer" else "ellipsis")
    for r in rows:
        table.add_row(r.layer, r.pass_, r.quantity, f"{r.error:.2e}", f"{r.tolerance:.2e}", f"{r.ratio:.3f}",
                      "[red]MISMATCH[/]" if r.status == "mismatch" else "ok")
    print_table(table, console)
    p = report.propagated
    console.print(f"end to end (NumPy run on its own): max relative difference {p['max_relative_forward']:.1e} "
                  f"forward ({p['worst_forward']}), {p['max_relative_backward']:.1e} backward "
                  f"({p['worst_backward']}); ReLU sign flips: {sum(k['count'] for k in p['kinks'])}")
    first = report.first_divergence
    verdict = "[green]agree[/]" if report.verdict == "agree" else "[red]mismatch[/]"
    where = f" — first divergence: {first['layer']} {first['pass']} {first['quantity']}" if first else ""
    console.print(f"{verdict}: {len(report.rows)} comparisons in {report.seconds:.1f} s{where}")
