"""``densenet-debug diff``: backend A against backend B, layer by layer, both judged against an fp64 oracle."""

from __future__ import annotations

import argparse
import json

import torch

from densenet_debug.atomic import write_text
from densenet_debug.backends import backend_names, default_pair, parse_backend
from densenet_debug.cli._common import (
    add_device_arg,
    add_model_args,
    add_quiet_arg,
    add_seed_arg,
    add_threads_arg,
    check_outputs,
    load_model,
    positive_int,
    require_parameters,
    resolve_device,
)
from densenet_debug.errors import UsageError
from densenet_debug.models.batch import make_batch
from densenet_debug.table import make_console

HELP = "compare two backends layer by layer against a float64 oracle"
EXIT_CODES = {0: "both sides agree with the fp64 oracle",
              1: "a mismatch (of a unit or, with --ops, of an op), a custom autograd Function whose backward is wrong "
                 "(math), or a kink with --fail-on kink"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--a", default=None, metavar="BACKEND",
                        help="first backend (default: cudnn with CUDA, else mkldnn); compose with '+', e.g. "
                             "mkldnn+channels_last; valid: " + ", ".join(backend_names()) + "; or ddp[:N][+HOOK]: "
                             "DistributedDataParallel on N gloo processes vs the other side in one process")
    parser.add_argument("--b", default=None, metavar="BACKEND",
                        help="second backend (default: no-cudnn with CUDA, else native)")
    add_device_arg(parser)
    add_model_args(parser, batch=8)
    add_seed_arg(parser)
    parser.add_argument("--steps", type=positive_int, default=1,
                        help="training steps to compare; BN buffers and weight updates carry over (default 1)")
    parser.add_argument("--eval", action="store_true", help="run forward and backward in eval mode")
    parser.add_argument("--bisect", action="store_true",
                        help="on a mismatch, narrow each failing composed backend to the component or pair")
    parser.add_argument("--fail-on", choices=("mismatch", "kink"), default="mismatch",
                        help="'kink' also fails when only kinks explain a difference (default mismatch)")
    parser.add_argument("--no-math-check", dest="math_check", action="store_false",
                        help="skip the float64 finite-difference check of every custom autograd Function's "
                             "backward (status 'math'; on by default)")
    parser.add_argument("--units", default=None, metavar="NAME,NAME",
                        help="only these units (qualified module names); default every unit")
    parser.add_argument("--top", type=positive_int, default=None, metavar="N",
                        help="rows per table (default 15); given, the worst N rows of every mode (propagated "
                             "and kink rows included) and the kinks by unit follow the leading table")
    parser.add_argument("--ops", action="store_true",
                        help="also replay every aten op of each side (every step) on the fp64 oracle's inputs to "
                             "that op: rows of mode 'op' (module · aten op · quantity) in the same report and "
                             "tables; a failing op is a finding, first_divergence names the op; with --units, "
                             "only the ops inside those units")
    add_threads_arg(parser)
    add_quiet_arg(parser)
    parser.add_argument("--json", default=None, metavar="PATH", help="write the JSON report here")
    parser.add_argument("--html", default=None, metavar="PATH", help="write a self-contained HTML report here")


def run(args: argparse.Namespace) -> int:
    from densenet_debug.distributed.diff import parse_ddp_side
    from densenet_debug.verdict.engine import diff
    from densenet_debug.verdict.render import print_report, to_html

    check_outputs(args, json=None, html=None)
    if parse_ddp_side(args.a) or parse_ddp_side(args.b):  # DDP vs one process: parameter gradients, own path
        return _run_ddp(args)
    device = resolve_device(args.device) if args.device else None
    da, db = default_pair(device)
    a, b = args.a or da, args.b or db
    parse_backend(a, device), parse_backend(b, device)  # bad names fail before the model is built
    torch.manual_seed(args.seed)
    model = load_model(args)
    require_parameters(model, args.model)
    x, y = make_batch(model, args.input_shape, args.batch, args.seed, args.num_classes, args.model)
    units = [u.strip() for u in args.units.split(",") if u.strip()] if args.units else None
    if units:
        known = dict(model.named_modules())
        missing = [u for u in units if u not in known]
        if missing:
            raise UsageError(f"no module named {missing[0]!r} in {args.model}")
    report = diff(model, x, y, a, b, steps=args.steps, eval_mode=args.eval, units=units, fail_on=args.fail_on,
                  device=device, math_check=args.math_check)
    if args.ops:
        from densenet_debug.verdict.ops import add_ops

        add_ops(report, model, x, y, a, b, device=device, units=units)
    console = make_console()
    print_report(report, console, args.top)
    if args.bisect and report.verdict == "mismatch":
        from densenet_debug.verdict.bisect import bisect_backend

        sides = {r.side for r in report.rows if r.status in ("mismatch", "nonfinite") and r.mode != "op"}
        bisected = []
        for side, spec in (("a", a), ("b", b)):
            if (side in sides or "both" in sides) and "+" in spec:
                res = bisect_backend(model, x, y, spec, steps=report.settings["steps"],
                                     eval_mode=report.settings["eval"], units=units, device=device)
                console.print(res.summary)
                bisected.append(res.to_json())
        if not bisected:
            console.print("bisect: no failing side is a composed backend; nothing to narrow")
        report.settings["bisect"] = bisected
    if args.json:
        write_text(args.json, json.dumps(report.to_json(), indent=1) + "\n")
    if args.html:
        write_text(args.html, to_html(report))
    return 0 if report.verdict == "agree" else 1


def _run_ddp(args: argparse.Namespace) -> int:
    """``diff`` when a side is ``ddp[:N][+HOOK]``: the other side (default mkldnn) is the one-process reference."""
    from rich.table import Table

    from densenet_debug.atomic import write_text
    from densenet_debug.distributed.diff import ddp_diff, parse_ddp_side
    from densenet_debug.table import make_console, print_table

    sides = [(spec, parse_ddp_side(spec)) for spec in (args.a, args.b)]
    ddp_sides = [parsed for _, parsed in sides if parsed is not None]
    if len(ddp_sides) != 1:
        raise UsageError("diff with ddp compares DDP with one process: give ddp[:N] as one side and a CPU backend "
                         "(e.g. mkldnn, native) as the other")
    world_size, hook = ddp_sides[0]
    other = next((spec for spec, parsed in sides if parsed is None), None) or "mkldnn"
    if args.device not in (None, "cpu"):
        raise UsageError("diff with ddp runs on CPU (gloo processes); drop --device")
    unsupported = [flag for flag, used in (("--steps", args.steps != 1), ("--bisect", args.bisect),
                                           ("--units", bool(args.units)), ("--html", bool(args.html)),
                                           ("--ops", args.ops)) if used]
    if unsupported:
        raise UsageError(f"{', '.join(unsupported)} not supported when a side is ddp")
    parse_backend(other, "cpu")
    torch.manual_seed(args.seed)
    model = load_model(args)
    require_parameters(model, args.model)
    x, y = make_batch(model, args.input_shape, args.batch, args.seed, args.num_classes, args.model)
    model.train(not args.eval)
    report = ddp_diff(model, x, y, other, world_size=world_size, comm_hook=hook, spec=args.model)
    console = make_console()
    table = Table(title=f"{report.side} vs {report.backend} (one process): parameter gradients, worst first")
    for column in ("layer", "quantity", "error", "tolerance", "status", "vs full batch"):
        table.add_column(column)
    ranked = sorted(report.rows, key=lambda r: r.error / r.tolerance if r.tolerance else float(r.error > 0) * 1e300,
                    reverse=True)
    for r in ranked[:args.top or 15]:
        table.add_row(r.layer, r.quantity, f"{r.error:.3g}", f"{r.tolerance:.3g}",
                      "[red]mismatch[/red]" if r.status == "mismatch" else "ok", f"{r.full_batch_gap:.3g}")
    print_table(table, console)
    console.print(report.summary(), highlight=False)
    if args.json:
        import json

        write_text(args.json, json.dumps(report.to_json(), indent=1) + "\n")
    return 0 if report.verdict == "agree" else 1
