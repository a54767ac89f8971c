"""``densenet-debug sweep cat-conv``: the cat -> conv bug class, case by case, both backends against fp64."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from densenet_debug.atomic import write_text
from densenet_debug.backends import backend_names, default_pair, parse_backend
from densenet_debug.cli._common import (
    add_device_arg,
    add_quiet_arg,
    add_seed_arg,
    add_threads_arg,
    check_outputs,
    resolve_device,
)
from densenet_debug.table import make_console, print_table

HELP = ("sweep the cat->conv configurations of the 2017 DenseNet bug (layouts, batch 1/2/odd, channel splits, "
        "sliced grad_outputs, BN modes) for two backends against fp64")
EXIT_CODES = {0: "every case agrees", 1: "a case mismatches"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=["cat-conv"], help="the sweep to run (cat-conv)")
    parser.add_argument("--a", default=None, metavar="BACKEND",
                        help="first backend (default cudnn with CUDA, else mkldnn); valid: "
                             + ", ".join(backend_names()))
    parser.add_argument("--b", default=None, metavar="BACKEND", help="second backend (default no-cudnn / native)")
    add_device_arg(parser)
    add_seed_arg(parser)
    parser.add_argument("--ops", action="store_true",
                        help="also judge every aten op of each case on the fp64 oracle's inputs to it (as diff "
                             "--ops); a failing case names its first failing op")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every case's result here")
    add_threads_arg(parser)
    add_quiet_arg(parser)


def _cell(result: object) -> str:
    n = f"n{result.case.batch}"
    if result.verdict == "agree":
        return f"[green]ok[/] {n}"
    return f"[bold red]x {result.failing_sides or '?'}[/] {n}"


def run(args: argparse.Namespace) -> int:
    from densenet_debug.verdict.sweep import GRADS, KERNELS, LAYOUTS, NORMS, run_sweep

    check_outputs(args, json=None)
    device = resolve_device(args.device)
    da, db = default_pair(device)
    a, b = args.a or da, args.b or db
    parse_backend(a, device), parse_backend(b, device)
    results = run_sweep(a, b, str(device), seed=args.seed, ops=args.ops)
    by_key = {(r.case.layout, r.case.grad, r.case.kernel, r.case.stride, r.case.norm): r for r in results}
    table = Table(title=f"cat -> conv sweep: a = {a}, b = {b}, each case against fp64 "
                        f"(cell: ok, or x and the failing side; nB = batch)")
    table.add_column("inputs / conv grad_output")
    for kernel, stride in KERNELS:
        for norm in NORMS:
            table.add_column(f"{kernel}x{kernel}/s{stride}\nBN {norm}", justify="center")
    for layout in LAYOUTS:
        for grad in GRADS:
            cells = [_cell(by_key[(layout, grad, k, s, n)]) for k, s in KERNELS for n in NORMS
                     if (layout, grad, k, s, n) in by_key]
            table.add_row(f"{layout} / {grad}", *cells)
    console = make_console()
    print_table(table, console)
    bad = [r for r in results if r.verdict != "agree"]
    for r in bad:
        f = r.first or {}
        op = f" · {f['op']}" if f.get("op") else ""
        console.print(f"[red]mismatch[/] {r.case.id}: side {f.get('side')} at {f.get('layer')}{op} "
                      f"({f.get('pass')} {f.get('quantity')}, {f.get('mode')})")
    console.print(f"{len(results) - len(bad)}/{len(results)} cases agree"
                  + ("" if not bad else f"; {len(bad)} mismatch"))
    if args.json:
        write_text(args.json, json.dumps({"schema": "densenet-debug/sweep-cat-conv/1", "a": a, "b": b,
                                          "cases": [r.to_json() for r in results]}, indent=1) + "\n")
    return 1 if bad else 0
