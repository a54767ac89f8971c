"""Progress (issue 13): the library's stages reach an installed reporter, and the CLI draws them as a rich bar
on a terminal only: a pseudo-terminal run shows one, a pipe and ``--quiet`` show none, and what a verb prints
is the same either way."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

from densenet_debug import progress

# -- the library side ----------------------------------------------------------------------------------------


class Recorder:
    """A reporter that logs every call: (event, label, value)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.state: dict[int, dict] = {}

    def open(self, label: str, total: float | None) -> object:
        handle = len(self.state)
        self.state[handle] = {"label": label, "total": total, "completed": 0.0, "detail": "", "open": True}
        self.events.append(("open", label, total))
        return handle

    def update(self, handle: object, *, advance: float = 0, completed: float | None = None,
               total: float | None = None, detail: str | None = None) -> None:
        s = self.state[handle]
        assert s["open"], "update after close"
        s["completed"] = (completed if completed is not None else s["completed"]) + advance
        s["total"] = total if total is not None else s["total"]
        s["detail"] = detail if detail is not None else s["detail"]

    def close(self, handle: object) -> None:
        self.state[handle]["open"] = False
        self.events.append(("close", self.state[handle]["label"], self.state[handle]["completed"]))


def test_without_a_reporter_every_call_is_a_no_op() -> None:
    assert not progress.active()
    with progress.step("x", total=3) as task:
        task.advance()
        task.update(completed=2, detail="d")
        progress.advance()
        progress.expect(4)
    assert task is progress.step("y")  # one shared do-nothing task: no allocation per call


def test_stages_nest_and_counts_go_to_the_innermost_open_one() -> None:
    rec = Recorder()
    with progress.installed(rec):
        assert progress.active()
        with progress.step("outer", total=2) as outer:
            with progress.step("inner"):
                progress.expect(5)
                for _ in range(5):
                    progress.advance()
            outer.advance()
            progress.advance()
    assert not progress.active()
    assert rec.events == [("open", "outer", 2), ("open", "inner", None), ("close", "inner", 5.0),
                          ("close", "outer", 2.0)]
    assert rec.state[1]["total"] == 5


def test_a_stage_closed_out_of_order_leaves_the_others_open() -> None:
    rec = Recorder()
    with progress.installed(rec):
        a, b = progress.step("a"), progress.step("b")
        a.close()
        progress.advance()  # b is the only open stage now
        b.close()
        b.close()  # twice is harmless
        progress.advance()  # none open: nothing happens
    assert rec.state[1]["completed"] == 1 and rec.state[0]["completed"] == 0


def test_a_stage_closes_when_its_function_raises() -> None:
    rec = Recorder()

    @progress.stage("boom")
    def fails() -> None:
        progress.expect(3)
        progress.advance()
        raise ValueError("inside")

    with progress.installed(rec):
        with pytest.raises(ValueError):
            fails()
        with progress.step("next"):
            progress.advance(2)  # counts into the new stage, not the failed one
    assert rec.events == [("open", "boom", None), ("close", "boom", 1.0), ("open", "next", None),
                          ("close", "next", 2.0)]


def test_a_stage_decorator_spans_the_call_and_tracing_counts_units(tiny_model, batch) -> None:
    from densenet_debug.trace import trace_step

    rec = Recorder()
    model = tiny_model()
    x, y = batch(2)

    @progress.stage("traced")
    def run() -> int:
        return len(trace_step(model, x, y))

    with progress.installed(rec):
        units = run()
    assert rec.events[0] == ("open", "traced", None) and rec.events[-1][:2] == ("close", "traced")
    assert rec.state[0]["total"] == 2 * units  # every unit's forward and backward
    assert rec.state[0]["completed"] == 2 * units


def test_diff_reports_its_stages(tiny_model, batch) -> None:
    from densenet_debug.verdict.engine import diff

    rec = Recorder()
    x, y = batch(2)
    with progress.installed(rec):
        report = diff(tiny_model(), x, y, "mkldnn", "native")
    labels = [label for event, label, _ in rec.events if event == "open"]
    assert labels[0] == "oracle: float64 step traced"
    assert labels.count("judging units") == 1
    local = [h for h, s in rec.state.items() if s["label"].startswith("local: units")]
    assert len(local) == 1  # one step: both sides judged unit by unit in one stage
    assert rec.state[local[0]]["completed"] == rec.state[local[0]]["total"] == report.settings["units"]
    assert any(label.startswith("mkldnn") for label in labels) and any(label.startswith("native") for label in labels)
    assert labels.count("between: code between units checked") == 2  # once per side
    assert all(not s["open"] for s in rec.state.values())


def test_timings_add_up_each_stage_by_label(tiny_model, batch) -> None:
    from densenet_debug.verdict.engine import diff

    timings = progress.Timings()
    x, y = batch(2)
    start = time.perf_counter()
    with progress.installed(timings):
        diff(tiny_model(), x, y, "mkldnn", "native")
    total = time.perf_counter() - start
    seconds = timings.seconds
    assert {"oracle: float64 step traced", "judging units", "local: units teacher-forced", "mkldnn: step traced",
            "native: step traced", "propagated: end to end compared"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values())
    # inclusive and nested: the stages inside "judging units" fit in it, and the two top stages in the diff
    inside = sum(v for k, v in seconds.items() if k not in ("judging units", "oracle: float64 step traced"))
    assert inside <= seconds["judging units"]
    assert seconds["judging units"] + seconds["oracle: float64 step traced"] <= total


# -- the CLI: a terminal gets a bar, a pipe or --quiet none --------------------------------------------------

DIFF = ["diff", "--model", "densenet-bc-10", "--input-shape", "3,16,16", "--batch", "2", "--threads", "1",
        "--a", "mkldnn", "--b", "native"]
BAR = "━"  # rich's bar glyph


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_TERMINAL", "TTY_COMPATIBLE", "TTY_INTERACTIVE",
                                                             "NO_COLOR", "TERM", "COLUMNS", "LINES")}
    env.update(TERM="xterm-256color", OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    return env


def _run(args: list[str], stderr_tty: bool) -> tuple[int, str, str]:
    """The CLI with stdout on a pipe and stderr on a pseudo-terminal (or a pipe): (code, stdout, stderr)."""
    cmd = [sys.executable, "-m", "densenet_debug", *args]
    if not stderr_tty:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
        return p.returncode, p.stdout, p.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, timeout=600,
                           env=_env())
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    return p.returncode, p.stdout.decode(), b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[int, str, str]]:
    return {"tty": _run(DIFF, True), "pipe": _run(DIFF, False), "quiet": _run(DIFF + ["--quiet"], True)}


def test_a_terminal_shows_a_bar_with_the_stages(runs) -> None:
    code, _, err = runs["tty"]
    assert code == 0
    assert BAR in err
    assert "oracle: float64 step traced" in err and "judging units" in err
    assert "eta" in err


def test_a_pipe_and_quiet_show_no_bar(runs) -> None:
    for name in ("pipe", "quiet"):
        code, _, err = runs[name]
        assert code == 0, name
        assert BAR not in err and "judging units" not in err and "\x1b" not in err, (name, err[:300])


def test_output_is_otherwise_unchanged(runs) -> None:
    outs = {name: out for name, (_, out, _) in runs.items()}
    assert "agree" in outs["pipe"]
    assert outs["tty"] == outs["pipe"] == outs["quiet"]


def test_every_verb_that_computes_takes_quiet() -> None:
    from densenet_debug.cli import build_parser

    verbs = build_parser()._subparsers._group_actions[0].choices
    for verb in ("diff", "sweep", "gradcheck", "oracle", "record", "check-reference", "selftest", "canary", "train"):
        assert "--quiet" in verbs[verb]._option_string_actions, verb
