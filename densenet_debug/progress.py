"""Progress of long computations: the library reports, whoever installed a reporter shows it.

Library code marks its long stages and counts their work::

    with progress.step("judging units", total=len(names)) as task:
        for name in names:
            ...
            task.advance()

and code deep inside a stage that knows the size of its own work (the tracer's hooks) adds to whatever stage
is open: :func:`expect` (more work) and :func:`advance` (work done). With no reporter installed (the library
used from Python, tests, a pipe) every call is a no-op costing one context-variable read, so hot loops may
call it per unit.

The CLI installs the one reporter, :func:`bar`: a ``rich`` progress bar with elapsed time and ETA on stderr,
drawn only when stderr is a terminal and ``--quiet`` is not given, and only while a stage is open (so nothing
the verbs print is wrapped or redirected). The library never imports the CLI; this module imports ``rich``
only when a bar is actually drawn.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, TypeVar

F = TypeVar("F", bound=Callable)


class Reporter(Protocol):
    """What :func:`step` talks to: one open task per stage, nested stages show as nested rows."""

    def open(self, label: str, total: float | None) -> object: ...

    def update(self, handle: object, *, advance: float = 0, completed: float | None = None,
               total: float | None = None, detail: str | None = None) -> None: ...

    def close(self, handle: object) -> None: ...


_REPORTER: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("densenet_debug_progress", default=None)
_OPEN: contextvars.ContextVar[tuple[Task, ...]] = contextvars.ContextVar("densenet_debug_progress_open", default=())


class Task:
    """One open stage. Every method is a no-op once closed, or when no reporter was installed at :func:`step`."""

    __slots__ = ("_reporter", "_handle", "_total", "label")

    def __init__(self, reporter: Reporter | None, label: str, total: float | None) -> None:
        self._reporter = reporter
        self.label = label
        self._total = total
        self._handle = reporter.open(label, total) if reporter is not None else None

    def advance(self, n: float = 1) -> None:
        if self._reporter is not None:
            self._reporter.update(self._handle, advance=n)

    def expect(self, n: float) -> None:
        """``n`` more items of work than said so far (an unknown total becomes ``n``)."""
        if self._reporter is not None:
            self._total = (self._total or 0) + n
            self._reporter.update(self._handle, total=self._total)

    def update(self, *, completed: float | None = None, total: float | None = None,
               detail: str | None = None) -> None:
        """Set what is done, the total, and a detail shown after the label (e.g. the unit now checked)."""
        if self._reporter is not None:
            if total is not None:
                self._total = total
            self._reporter.update(self._handle, completed=completed, total=total, detail=detail)

    def close(self) -> None:
        if self._reporter is not None:
            reporter, self._reporter = self._reporter, None
            _OPEN.set(tuple(t for t in _OPEN.get() if t is not self))  # in any order, not only innermost first
            reporter.close(self._handle)

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_NOOP = Task(None, "", None)


def step(label: str, total: float | None = None) -> Task:
    """Open a stage of ``total`` items (None: not known yet, see :meth:`Task.expect`); use it in a ``with``.

    While it is open, :func:`advance` and :func:`expect` count into it (the innermost open stage)."""
    reporter = _REPORTER.get()
    if reporter is None:
        return _NOOP
    task = Task(reporter, label, total)
    _OPEN.set(_OPEN.get() + (task,))
    return task


def stage(label: str) -> Callable[[F], F]:
    """Decorator: the function's whole call is one stage (its work counted by :func:`expect`/:func:`advance`)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: object, **kwargs: object) -> object:
            if _REPORTER.get() is None:
                return fn(*args, **kwargs)
            with step(label):
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap


def advance(n: float = 1) -> None:
    """``n`` items of the innermost open stage done; nothing when none is open."""
    if _REPORTER.get() is not None:
        open_ = _OPEN.get()
        if open_:
            open_[-1].advance(n)


def expect(n: float) -> None:
    """``n`` more items for the innermost open stage (the tracer adds its units to the stage tracing)."""
    if _REPORTER.get() is not None:
        open_ = _OPEN.get()
        if open_:
            open_[-1].expect(n)


def active() -> bool:
    """True when a reporter is installed (code may skip preparing details nobody will see)."""
    return _REPORTER.get() is not None


@contextmanager
def installed(reporter: Reporter | None) -> Iterator[None]:
    """Report the stages opened inside the block to ``reporter`` (None: to nobody)."""
    token = _REPORTER.set(reporter)
    open_token = _OPEN.set(())
    try:
        yield
    finally:
        _OPEN.reset(open_token)
        _REPORTER.reset(token)


class Timings:
    """A :class:`Reporter` that draws nothing and adds up each stage's wall seconds by label (``seconds``).

    Stages nest, so the figures are inclusive (a side's traced step inside "judging units" counts in both);
    a label opened more than once (a step per side, per training step) sums its openings. ``scripts/bench.py
    diff`` reports them to say where a diff's time goes.
    """

    def __init__(self) -> None:
        import time

        self._clock = time.perf_counter
        self.seconds: dict[str, float] = {}

    def open(self, label: str, total: float | None) -> object:
        return (label, self._clock())

    def update(self, handle: object, *, advance: float = 0, completed: float | None = None,
               total: float | None = None, detail: str | None = None) -> None:
        pass

    def close(self, handle: object) -> None:
        label, start = handle  # type: ignore[misc]
        self.seconds[label] = self.seconds.get(label, 0.0) + self._clock() - start


class RichBar:
    """A :class:`Reporter` drawing every open stage as a row of one transient ``rich`` progress display.

    The display is live only while at least one stage is open: it starts with the first and stops (erasing
    itself) when the last one closes, so text printed between stages is never interleaved with it. Standard
    output and error are not redirected.
    """

    def __init__(self, console: object) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[detail]}"),
            console=console, transient=True, redirect_stdout=False, redirect_stderr=False,
        )
        self._open = 0

    def open(self, label: str, total: float | None) -> object:
        handle = self._progress.add_task(label, total=total, detail="")
        self._open += 1
        if self._open == 1:
            self._progress.start()
        return handle

    def update(self, handle: object, *, advance: float = 0, completed: float | None = None,
               total: float | None = None, detail: str | None = None) -> None:
        kwargs: dict = {}
        if advance:
            kwargs["advance"] = advance
        if completed is not None:
            kwargs["completed"] = completed
        if total is not None:
            kwargs["total"] = total
        if detail is not None:
            kwargs["detail"] = detail
        self._progress.update(handle, **kwargs)  # type: ignore[arg-type]

    def close(self, handle: object) -> None:
        self._progress.remove_task(handle)  # type: ignore[arg-type]
        self._open -= 1
        if self._open == 0:
            self._progress.stop()

    def stop(self) -> None:
        if self._open:
            self._open = 0
            self._progress.stop()


@contextmanager
def bar(enabled: bool = True, console: object | None = None) -> Iterator[None]:
    """Install a :class:`RichBar` on ``console`` (default: stderr) for the block, when ``enabled`` and the
    console is a terminal; otherwise install nothing (every progress call stays a no-op)."""
    if not enabled:
        yield
        return
    if console is None:
        import sys

        if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):  # decided before rich is imported
            yield
            return
        from rich.console import Console

        console = Console(stderr=True)
    if not getattr(console, "is_terminal", False):
        yield
        return
    reporter = RichBar(console)
    try:
        with installed(reporter):
            yield
    finally:
        reporter.stop()
