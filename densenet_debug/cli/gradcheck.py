"""``densenet-debug gradcheck``: every unit's backward against finite differences, in float64."""

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
    require_parameters,
    resolve_device,
)
from densenet_debug.errors import UsageError, describe
from densenet_debug.gradcheck.engine import MODES, gradcheck_model
from densenet_debug.gradcheck.report import GradcheckReport
from densenet_debug.models.batch import make_batch
from densenet_debug.models.copies import fp64_copy
from densenet_debug.progress import step as progress_step
from densenet_debug.table import make_console, print_table
from densenet_debug.trace import discover_units

HELP = "check every unit's backward against finite differences (fp64, teacher-forced, kink-aware)"
EXIT_CODES = {0: "every unit passes", 1: "a unit's gradient fails its check"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, batch=2)
    add_seed_arg(parser)
    add_device_arg(parser)
    parser.add_argument("--mode", choices=MODES, default="fast",
                        help="fast: random directions, every unit in seconds; full: whole Jacobians of tensors "
                             "under a size limit (2^22 entries and 8192 a side; 2^24 and 16384 for a unit named "
                             "with --layer), fast above it")
    parser.add_argument("--layer", action="extend", nargs="+", default=None, metavar="NAME",
                        help="check only these units, or the units inside these modules (several names, or "
                             "the flag repeated; see --list)")
    parser.add_argument("--eval", action="store_true", help="BatchNorm with running statistics (default: batch)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON (schema densenet-debug/gradcheck/1)")
    parser.add_argument("--list", action="store_true", help="list the units that would be checked and exit")
    parser.add_argument("--all-rows", action="store_true", help="print every row, not only failures and the worst")
    add_threads_arg(parser)
    add_quiet_arg(parser)


def run(args: argparse.Namespace) -> int:
    check_outputs(args, json=None)
    torch.manual_seed(args.seed)
    model = load_model(args)
    require_parameters(model, args.model)
    device = resolve_device(args.device)
    model = model.to(device)
    x, y = _batch(model, args, device)
    if args.list:
        probe = fp64_copy(model).train(not args.eval)
        for name in discover_units(probe, x.to(torch.float64)):
            print(name or "(model)")
        return 0
    with progress_step("gradcheck: units checked") as task:

        def progress(done: int, total: int, name: str) -> None:
            task.update(completed=done, total=total, detail=name)

        try:
            report = gradcheck_model(model, x, y, mode=args.mode, layers=args.layer, seed=args.seed,
                                     eval_mode=args.eval, progress=progress)
        except OverflowError as exc:  # squares of values near 1e170 leave float64: the model, not the check
            raise UsageError(f"model {args.model}: its values overflow float64 arithmetic during the check "
                             f"({describe(exc)}); finite differences cannot check gradients this large, "
                             f"rescale the model or its inputs") from exc
    _print(report, args.all_rows)
    if args.json:
        write_text(args.json, json.dumps(report.to_json(), indent=2) + "\n")
    return 0 if report.verdict == "pass" else 1



def _batch(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, ...]:
    x, y = make_batch(model, args.input_shape, args.batch, args.seed, args.num_classes, args.model)
    return x.to(device), y.to(device)


def _print(report: GradcheckReport, all_rows: bool, worst: int = 12) -> None:
    console = make_console()
    rows = report.rows
    if not all_rows:
        shown = [r for r in rows if r.status in ("fail", "nonfinite", "kink")]
        rest = sorted((r for r in rows if r.status not in ("fail", "nonfinite", "kink") and r.tolerance > 0),
                      key=lambda r: r.error / r.tolerance, reverse=True)
        rows = shown + rest[:max(0, worst - len(shown))]
    table = Table(title=f"gradcheck ({report.mode}): {'all rows' if all_rows else 'failures and closest rows'}")
    for col in ("unit", "tensor", "error", "tolerance", "err/tol", "resolution", "step", "kinks", "status"):
        table.add_column(col, justify="left" if col in ("unit", "tensor", "status") else "right",
                         overflow="fold", no_wrap=col not in ("unit", "tensor"))
    for r in rows:
        ratio = r.error / r.tolerance if r.tolerance > 0 else (0.0 if r.error == 0 else float("inf"))
        status = {"fail": "[red]FAIL[/]" + (" (culprit)" if r.culprit else ""), "kink": "[yellow]kink[/]",
                  "skip": "skip", "nonfinite": "[red]NaN/Inf[/]"}.get(r.status, "ok")
        table.add_row(r.layer or "(model)", r.tensor, f"{r.error:.2e}", f"{r.tolerance:.2e}", f"{ratio:.3f}",
                      "-" if r.resolution is None else f"{r.resolution:.1e}", f"{r.step:.0e}", str(r.kinks), status)
    print_table(table, console)
    outputs = [k for k in report.kinks if not k.ops]
    if outputs:
        total = sum(k.count for k in outputs)
        console.print(f"kinks: {total} outputs in {len(outputs)} checks crossed a non-smooth point "
                      "(ReLU at 0 ...); masked and re-checked" +
                      ("" if all(k.resolved for k in outputs) else ", some could not be verified"))
    inside = [k for k in report.kinks if k.ops]
    if inside:  # piecewise ops inside composites and the whole model: bounded in the tolerance, or a kink row
        ops = sorted({op for k in inside for op in k.ops})
        console.print(f"op-level kinks: {sum(k.count for k in inside)} elements in {len(inside)} checks crossed a "
                      "branch of " + ", ".join(ops[:6]) + (f" and {len(ops) - 6} more" if len(ops) > 6 else "") +
                      "; bounded in the tolerance" +
                      ("" if all(k.resolved for k in inside) else ", some could not be avoided (rows marked kink)"))
    res = [r.resolution for r in report.rows if r.resolution is not None]
    worst_res = (f"; detects a gradient error >= {max(res):.1e} of its terms' size (‖|J|ᵀ|v|‖) in any tensor "
                 "(p >= 1 - 1e-6)") if res else ""
    verdict = "[green]pass[/]" if report.verdict == "pass" else "[red]FAIL[/]"
    first = report.first_failure
    where = f" — first culprit: {first.get('layer') or '(model)'} ({first.get('tensor')})" if first else ""
    console.print(f"{verdict}: {len(report.units)} units, {len(report.rows)} checks in {report.seconds:.1f} s"
                  f"{worst_res}{where}")

