"""``densenet-debug selftest``: plant every known backend bug and check that diff catches and localises it."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from densenet_debug.atomic import write_text
from densenet_debug.cli._common import add_device_arg, add_quiet_arg, add_threads_arg, check_outputs, positive_int
from densenet_debug.errors import UsageError
from densenet_debug.faults.registry import FAULTS
from densenet_debug.models import BUILDERS
from densenet_debug.progress import step as progress_step
from densenet_debug.table import make_console, print_table

HELP = ("plant faithful copies of historical backend bugs (and precision controls) in a small DenseNet-BC; "
        "check diff detects and localises each and flags no control (with --ops: the op engine too)")
EXIT_CODES = {0: "every fault caught and localised, no control flagged (by both engines with --ops)",
              1: "a fault missed or a control flagged (by either engine)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--faults", nargs="+", default=["all"], metavar="NAME[=MAG]",
                        help="faults to plant, each with an optional magnitude (default all); known: "
                             + ", ".join(FAULTS))
    parser.add_argument("--model", default=None, choices=sorted(BUILDERS), metavar="NAME",
                        help="model to plant in (default densenet-bc-16; densenet-bc-100 with --full)")
    parser.add_argument("--full", action="store_true", help="use DenseNet-BC-100 (minutes instead of seconds)")
    parser.add_argument("--batch", type=positive_int, default=4, help="batch size (default 4; #708 needs >= 2)")
    parser.add_argument("--backend", default=None,
                        help="backend both sides run on, one with the fault planted (default native on CPU, "
                             "cudnn on CUDA)")
    parser.add_argument("--no-gradcheck", action="store_true",
                        help="skip the numerical gradient check of the faults that are in the math")
    parser.add_argument("--ops", action="store_true",
                        help="also judge every planting with the op engine (diff --ops): each fault must be a "
                             "finding at the planted unit and the expected aten op, each control agreed; a fault "
                             "it cannot see by design is listed as blind, with the reason")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for weights, inputs, labels and the unit each fault is planted at (default 0)")
    add_device_arg(parser)
    parser.add_argument("--json", default=None, metavar="PATH", help="write the JSON report here")
    add_threads_arg(parser)
    add_quiet_arg(parser)


def run(args: argparse.Namespace) -> int:
    from densenet_debug.backends import parse_backend
    from densenet_debug.cli._common import resolve_device
    from densenet_debug.faults.selftest import DEFAULT_MODEL, FULL_MODEL, resolve_faults, run_selftest

    check_outputs(args, json=None)
    if args.full and args.model:
        raise UsageError("--full picks densenet-bc-100; give either --full or --model")
    names = resolve_faults(args.faults)
    device = resolve_device(args.device)
    backend = args.backend or ("cudnn" if device.type == "cuda" else "native")
    if any(p.strip().startswith("fault:") for p in backend.split("+")):
        raise UsageError("--backend is the clean backend; the self-test plants the faults itself")
    parse_backend(backend, device)
    model = FULL_MODEL if args.full else (args.model or DEFAULT_MODEL)
    console = make_console()
    with progress_step("self-test: faults planted", total=len(names)) as task:

        def progress(i: int, n: int, name: str) -> None:
            task.update(completed=i, detail=name)

        report = run_selftest(names, model=model, seed=args.seed, batch=args.batch, backend=backend,
                              device=str(device), gradcheck=not args.no_gradcheck, ops=args.ops,
                              progress=progress)
    print_table(_table(report), console)
    missed, flagged, loose = report.missed, report.flagged_controls, report.not_localized
    bugs = sum(1 for r in report.results if not r.control)
    caught = bugs - len(missed)
    localized = bugs - len(loose)
    console.print(f"{caught}/{bugs} faults detected, {localized}/{bugs} localised to the planted unit and pass, "
                  f"{len(flagged)} of {len(report.results) - bugs} controls flagged ({report.seconds:.1f} s, "
                  f"{model}, batch {args.batch}, backend {backend}, seed {args.seed})")
    if args.ops:
        console.print(_ops_summary(report))
    if missed:
        console.print(f"[red]MISSED:[/red] {', '.join(missed)}")
    if flagged:
        console.print(f"[red]FALSE ALARM on control:[/red] {', '.join(flagged)}")
    if args.json:
        write_text(args.json, json.dumps(report.to_json(), indent=1) + "\n")
    return 0 if report.passed else 1


def _table(report: object) -> Table:
    table = Table(title=f"self-test: {report.model}, batch {report.batch}, backend {report.backend}")
    with_ops = any(r.ops is not None for r in report.results)
    cols = ("fault", "planted at", "mode", "diff", "localised", "error", "tolerance", "gradcheck")
    for col in cols + (("op engine", "at op") if with_ops else ()) + ("s",):
        table.add_column(col, justify="right" if col in ("error", "tolerance", "s") else "left",
                         no_wrap=col in ("fault", "planted at", "error", "tolerance"))
    for r in report.results:
        if r.control:
            verdict = "[red]FLAGGED[/red]" if r.detected else "[green]quiet[/green]"
            where = "-"
        else:
            verdict = "[green]detected[/green]" if r.detected else "[red]MISSED[/red]"
            fd = r.first_divergence or {}
            where = (f"[green]yes[/green] {r.passes}" if r.localized
                     else f"[yellow]no[/yellow]: {fd.get('layer')} {fd.get('pass')}" if fd else "-")
        needs = " ".join(_MODE.get(k, f"{k}={v}") for k, v in r.needs.items()) or "-"
        gc = {None: "-", "fail": "[green]fail[/green]" if not r.control else "[red]fail[/red]",
              "pass": "[red]pass[/red]" if not r.control else "pass"}[r.gradcheck]
        if r.gradcheck_layer and r.gradcheck_layer != r.layer:
            gc += f" at {r.gradcheck_layer}"
        extra = _ops_cells(r.ops) if with_ops else ()
        table.add_row(f"{r.name}{' (control)' if r.control else ''}", r.layer, needs, verdict, where,
                      _fmt(r.error), _fmt(r.tolerance), gc, *extra, f"{r.seconds:.1f}")
    return table


def _ops_cells(o: object) -> tuple[str, str]:
    """The op engine's verdict on one planting, and the op it rests on."""
    if o is None:
        return "-", "-"
    if o.expected == "blind":
        return "[yellow]blind[/yellow]" + (" (found)" if o.found else ""), o.note
    if o.expected == "agree":
        verdict = "[red]FLAGGED[/red]" if o.found else "[green]agree[/green]"
    elif not o.found:
        verdict = "[red]MISSED[/red]"
    else:
        verdict = "[green]found[/green]" if o.localized else "[yellow]found elsewhere[/yellow]"
    at = "-" if o.op is None else f"{o.op} ({o.pass_}, {o.kind})"
    if o.expected == "finding" and o.found and not o.localized:
        at += f"; wanted {' or '.join(o.want_ops) or 'any op'} at the planted unit"
    return verdict, at


def _ops_summary(report: object) -> str:
    ops = [r.ops for r in report.results if r.ops is not None]
    wanted = [o for o in ops if o.expected == "finding"]
    blind = sum(o.expected == "blind" for o in ops)
    controls = [o for o in ops if o.expected == "agree"]
    return (f"op engine: {sum(o.ok for o in wanted)}/{len(wanted)} faults found at the planted unit and expected op, "
            f"{blind} blind by design, {sum(not o.ok for o in controls)} of {len(controls)} controls flagged")


_MODE = {"steps": "2 steps", "eval": "eval", "min_batch": "N>=2", "pool_padding": "pad=1 pools",
         "memory_efficient": "checkpointed", "buffers": "BN buffers"}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"
