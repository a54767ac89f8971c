"""``densenet-debug oracle``: PyTorch float64 against an independent NumPy float64 oracle.

Our DenseNets run unit by unit from their state dict; any other model (``--model FILE.py:factory``), or ours
with ``--op-level``, runs through the NumPy op-level interpreter, op by op.
"""

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

HELP = ("compare PyTorch fp64 with an independent NumPy fp64 oracle (our DenseNets unit by unit, any other model "
        "op by op): outputs and gradients")
EXIT_CODES = {0: "PyTorch and NumPy agree", 1: "they disagree somewhere",
              2: "an op the NumPy oracle has no rule for, named with its module"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, batch=2)
    add_seed_arg(parser)
    add_device_arg(parser)
    parser.add_argument("--eval", action="store_true", help="BatchNorm with running statistics (default: train)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON (schema densenet-debug/oracle/1)")
    parser.add_argument("--all-rows", action="store_true", help="print every row, not only mismatches and the worst")
    parser.add_argument("--op-level", action="store_true",
                        help="run our DenseNets through the op-level interpreter too (any other model always is; "
                             "it runs PyTorch on the CPU)")
    add_threads_arg(parser)
    add_quiet_arg(parser)


def run(args: argparse.Namespace) -> int:
    check_outputs(args, json=None)
    torch.manual_seed(args.seed)
    model = load_model(args)
    device = resolve_device(args.device)
    model = model.to(device)
    x, y = make_batch(model, args.input_shape, args.batch, args.seed, args.num_classes, args.model)
    report = compare_with_torch(model, x.to(device), y.to(device), train=not args.eval,
                                op_level=True if args.op_level else None)
    _print(report, args.all_rows)
    if args.json:
        write_text(args.json, json.dumps(report.to_json(), indent=2) + "\n")
    return 0 if report.verdict == "agree" else 1


def _print(report: OracleReport, all_rows: bool, worst: int = 12) -> None:
    console = make_console()
    rows = report.rows
    op_level = report.environment.get("engine") == "op-level interpreter"
    bad = ("mismatch", "nonfinite")
    if not all_rows:
        rows = [r for r in report.rows if r.status in bad]
        rest = sorted((r for r in report.rows if r.status not in bad), key=lambda r: r.ratio, reverse=True)
        rows += rest[:max(0, worst - len(rows))]
    table = Table(title="PyTorch fp64 vs NumPy fp64, " + ("each op on PyTorch's own inputs, gradients end to end"
                                                          if op_level else "each unit on PyTorch's own inputs")
                  + ("" if all_rows else " (mismatches and closest rows)"))
    for col in ("layer", "pass", "quantity", "error", "tolerance", "err/tol", "status"):
        table.add_column(col, justify="right" if col in ("error", "tolerance", "err/tol") else "left",
                         overflow="fold" if col == "layer" else "ellipsis")
    for r in rows:
        status = f"[red]{r.status.upper()}[/]" if r.status in bad else "ok"
        table.add_row(f"{r.layer} · {r.op}" if r.op else r.layer, r.pass_, r.quantity, f"{r.error:.2e}",
                      f"{r.tolerance:.2e}", f"{r.ratio:.3f}", status)
    print_table(table, console)
    p = report.propagated
    if op_level:
        failing = sorted(k for k, v in report.modules.items() if v["failing"])
        console.print(f"op level: {sum(p['ops'].values())} ops of {len(p['ops'])} kinds in {p['modules']} modules; "
                      f"NumPy's own end-to-end loss differs from PyTorch's by {p['max_relative_forward']:.1e} "
                      "(relative)" + (f"; modules with failing rows: {', '.join(failing)}" if failing else ""))
        for note in p.get("notes", []):
            console.print(f"note: {note}")
    else:
            console.print(f"end to end (NumPy run on its own): max relative difference {p['max_relative_forward']:.1e} "
                      f"forward ({p['worst_forward']}), {p['max_relative_backward']:.1e} backward "
                      f"({p['worst_backward']}); ReLU sign flips: {sum(k['count'] for k in p['kinks'])}")
    first = report.first_divergence
    verdict = "[green]agree[/]" if report.verdict == "agree" else "[red]mismatch[/]"
    op = f" · {first['op']}" if first and first.get("op") else ""
    where = f" — first divergence: {first['layer']}{op} {first['pass']} {first['quantity']}" if first else ""
    where += f" ({first['note']})" if first and first.get("note") else ""
    console.print(f"{verdict}: {len(report.rows)} comparisons in {report.seconds:.1f} s{where}")
