"""``densenet-debug``: thin command-line shells over the library.

Each verb is a module in this package with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int`` (and
optionally ``EXIT_CODES``, what 0 and 1 mean for it); verbs are discovered, so adding one touches no other file.
Exit codes: 0 agree/pass, 1 a finding (mismatch, fail), 2 bad input or environment (a flag, a file, a lock
held by another process, memory), 3 internal error (a bug: one line naming the exception; ``--debug`` shows
the traceback), 130 interrupted.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_early(signum: int, frame: object) -> None:
    """Ctrl-C before main() took over (imports): nothing has been written yet, so leave at once."""
    for stream in (sys.stdout, sys.stderr):  # after main() returned, its output must not be lost
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: nothing more to save
            pass
    sys.stderr.write("interrupted\n")
    sys.stderr.flush()
    os._exit(130)


_interrupted_early.early = True  # type: ignore[attr-defined] - main() replaces any handler marked so


def install_early_interrupt() -> None:
    """Make Ctrl-C during start-up "interrupted", exit 130 (only as the program, not when imported by tests)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_early)


_ARGV0 = sys.argv[0] if sys.argv else ""
if os.path.basename(_ARGV0) == "densenet-debug" or _ARGV0.endswith(os.path.join("densenet_debug", "__main__.py")):
    install_early_interrupt()  # the console script, or python -m densenet_debug
if os.environ.get("DENSENET_DEBUG_TEST_PAUSE_IN_REPLACE", "").startswith("startup:"):  # tests only: Ctrl-C
    print("paused at startup", flush=True)  # lands here, before torch and the verbs are imported
    import time

    time.sleep(float(os.environ["DENSENET_DEBUG_TEST_PAUSE_IN_REPLACE"].split(":")[1]))

import argparse  # noqa: E402 - after the handler: Ctrl-C during imports is already "interrupted"
import importlib  # noqa: E402
import pkgutil  # noqa: E402
import threading  # noqa: E402
from collections.abc import Sequence  # noqa: E402

_INTERRUPTED = False
# True while main(), run as the program, imports the verbs (and torch): Ctrl-C then leaves at once, as at start-up
_IMPORTING = False


def _on_sigint(signum: int, frame: object) -> None:
    """Ctrl-C inside main(): unwind with KeyboardInterrupt (finally blocks remove temporaries and locks), and
    remember it, because a library may swallow the KeyboardInterrupt (a bare ``except`` while importing) and
    fail later with another error that is really the interrupt's."""
    global _INTERRUPTED
    if _IMPORTING:  # a KeyboardInterrupt unwinding through torch's C++ import code aborts (SIGABRT, exit -6)
        _interrupted_early(signum, frame)
    _INTERRUPTED = True
    raise KeyboardInterrupt


EXIT_CODES = {0: "agree / pass", 1: "a finding (mismatch, failure)", 2: "bad input or environment",
              3: "internal error (a bug; run with --debug for the traceback)", 130: "interrupted"}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _verbs() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def _epilog(codes: dict[int, str]) -> str:
    merged = {**EXIT_CODES, **codes}
    if 2 in codes:  # a verb says what bad input means for it; the meaning of the code stays the same
        merged[2] = f"{EXIT_CODES[2]} ({codes[2]})"
    return "exit codes: " + "; ".join(f"{k} {v}" for k, v in sorted(merged.items()))


def build_parser() -> argparse.ArgumentParser:
    from densenet_debug import __version__

    parser = _Parser(prog="densenet-debug", description=__doc__.splitlines()[0] if __doc__ else None,
                     epilog=_epilog({}))
    parser.add_argument("--version", action="version", version=f"densenet-debug {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for name in _verbs():
        module = importlib.import_module(f"{__name__}.{name}")
        verb = name.replace("_", "-")
        p = sub.add_parser(verb, help=module.HELP, description=module.HELP,
                           epilog=_epilog(getattr(module, "EXIT_CODES", {})))
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _error(verb: str | None, message: str) -> None:
    print(f"densenet-debug{' ' + verb if verb else ''}: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; every outcome is an exit code (module docstring), never a traceback without ``--debug``."""
    global _INTERRUPTED
    _INTERRUPTED = False
    previous = signal.getsignal(signal.SIGINT)
    as_program = getattr(previous, "early", False)
    ours = previous is signal.default_int_handler or as_program
    if ours and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)  # from here KeyboardInterrupt unwinds cleanly
    try:
        return _main(argv, as_program)
    finally:
        if ours and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)  # as the program: the early handler again, to the very end


def _main(argv: Sequence[str] | None, as_program: bool = False) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    verb = None
    global _IMPORTING
    try:
        _IMPORTING = as_program
        try:
            parser = build_parser()
        finally:
            _IMPORTING = False
        args = parser.parse_args(argv)
        verb, debug = getattr(args, "verb", None), bool(getattr(args, "debug", debug))
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        batch = getattr(args, "batch", None) or getattr(args, "batch_size", None)
        if batch and getattr(args, "input_shape", None):  # a batch that cannot fit: say so before allocating
            from densenet_debug.cli._common import check_batch_fits

            check_batch_fits(batch, tuple(args.input_shape))
        threads = getattr(args, "threads", None)
        if threads and verb != "canary":  # canary sets its own, per run
            import torch

            torch.set_num_threads(threads)
        import warnings

        from densenet_debug import progress

        formatted = warnings.formatwarning
        # a warning is one line of the verb's output, not a file:line and a line of source
        warnings.formatwarning = lambda message, *_args, **_kw: f"warning: {message}\n"
        try:
            # train draws its own per-epoch bar (one live display at a time); elsewhere the library's stages show
            with progress.bar(enabled=not getattr(args, "quiet", False) and verb != "train"):
                code = int(args._run(args) or 0)
        finally:
            warnings.formatwarning = formatted
        if _INTERRUPTED:  # a library swallowed the KeyboardInterrupt and the verb ran on: still the user's Ctrl-C
            _handled_interrupt()
            return 130
        return code
    except KeyboardInterrupt:
        _handled_interrupt()
        return 130
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure becomes an exit code and one line
        if _INTERRUPTED:  # the interrupt surfaced as another error (see _on_sigint)
            _handled_interrupt()
            return 130
        if debug:
            raise
        return _report(verb, exc)


def _handled_interrupt() -> None:
    """Say so, and tell CPython the KeyboardInterrupt was handled: when it passed through code run by PyRun_*
    (pybind11's exec while torch imports), CPython marks it unhandled and would kill the process with SIGINT at
    exit instead of exiting 130."""
    print("interrupted", file=sys.stderr)
    try:
        import ctypes

        ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt").value = 0
    except (ImportError, ValueError, AttributeError, OSError):  # another interpreter: SIGINT is fine too
        pass


def _report(verb: str | None, exc: BaseException) -> int:
    from densenet_debug.errors import UsageError, describe, first_line, is_allocation_failure

    if isinstance(exc, UsageError):
        _error(verb, first_line(exc))
        return 2
    if is_allocation_failure(exc):
        _error(verb, f"out of memory ({describe(exc)[:200]}); try a smaller --batch or --input-shape")
        return 2
    if isinstance(exc, OSError):  # a path the user gave: missing, unreadable, a directory, a full disk
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        _error(verb, f"{exc.strerror or first_line(exc)}{where}")
        return 2
    if not isinstance(exc, Exception):
        raise exc
    _error(verb, f"internal error: {describe(exc)[:300]} (run with --debug for the traceback)")
    return 3
