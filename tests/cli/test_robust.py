"""A crash is never a finding; writers do not race; replaces are atomic; Ctrl-C is clean (issue 14).

Behaviour about processes is tested with real processes and real signals: two writers started at once, a
writer SIGKILLed exactly at the critical point of a replace (the ``DENSENET_DEBUG_TEST_PAUSE_IN_REPLACE`` hook
makes it wait there), SIGINT sent at several moments from start-up on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from densenet_debug.cli import build_parser, main

PAUSE = "DENSENET_DEBUG_TEST_PAUSE_IN_REPLACE"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CLI = [sys.executable, "-m", "densenet_debug"]
TINY_RECORD = ["--model", "densenet-bc-10", "--batch", "2", "--input-shape", "3,16,16"]
TINY_TRAIN = ["--model", "densenet-bc-10", "--synthetic", "--input-shape", "3,8,8", "--synthetic-size", "32",
              "--batch-size", "16", "--epochs", "1", "--no-plot", "--quiet"]

MODELS = '''
import torch
from torch import nn
import torch.nn.functional as F


class NoParams(nn.Module):
    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class Huge(nn.Module):
    """Finite in float64, inf in float32: squares of its activations leave float64 (OverflowError)."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.conv(x) * 1e200, 1).flatten(1))


class Buggy(nn.Module):
    """Runs in eval mode (load_model's probe), then a bug of ours would look the same as this TypeError."""
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        if self.training:
            raise TypeError("unsupported operand in training")
        return self.fc(x.mean((2, 3)))


class _Wrong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 3


class RootMath(nn.Module):
    """A wrong backward in the model's own forward: the culprit is the model itself (unit name '')."""
    def __init__(self):
        super().__init__()
        self.weight_with_a_long_descriptive_name = nn.Parameter(torch.randn(10, 3))

    def forward(self, x):
        return _Wrong.apply(x.mean((2, 3)) @ self.weight_with_a_long_descriptive_name.t())


def noparams(num_classes=None):
    return NoParams()


def huge(num_classes=None):
    return Huge()


def buggy(num_classes=None):
    return Buggy()


def rootmath(num_classes=None):
    return RootMath()
'''


@pytest.fixture
def models(tmp_path: Path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return path


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- exit codes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("verb", ["diff", "gradcheck", "graph"])
def test_a_model_without_parameters_is_bad_input(verb: str, models: Path, tmp_path: Path, capsys) -> None:
    extra = ["--out", str(tmp_path / "g.dot")] if verb == "graph" else []
    assert main([verb, "--model", f"{models}:noparams", "--batch", "2", *extra]) == 2
    assert "has no parameters" in _one_line(capsys.readouterr().err)


def test_gradcheck_on_a_model_that_overflows_is_one_line_exit_2(models: Path, capsys) -> None:
    assert main(["gradcheck", "--model", f"{models}:huge", "--batch", "2"]) == 2
    assert "overflow" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv", [["info", "--model", "densenet-bc-10", "--input-shape", "3,100000,100000"],
                                  ["info", "--model", "densenet-bc-10", "--batch", "100000000"],
                                  ["diff", "--model", "densenet-bc-10", "--batch", "100000000"]])
def test_an_input_larger_than_memory_is_refused_before_allocating(argv: list[str]) -> None:
    done = subprocess.run(CLI + argv, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "smaller --batch" in _one_line(done.stderr)


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] . "
                                                             "DefaultCPUAllocator: can't allocate memory: you "
                                                             "tried to allocate 1099511627776 bytes."),
                                 RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")])
def test_allocation_failures_are_exit_2_suggesting_a_smaller_batch(exc, monkeypatch, capsys) -> None:
    import densenet_debug.cli.info as info

    def run(args):
        raise exc

    monkeypatch.setattr(info, "run", run)
    assert main(["info"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "out of memory" in line and "smaller --batch" in line


def test_a_crash_is_exit_3_with_one_line_never_1(models: Path, capsys) -> None:
    assert main(["diff", "--model", f"{models}:buggy", "--batch", "2", "--input-shape", "3,8,8"]) == 3
    line = _one_line(capsys.readouterr().err)
    assert "internal error: TypeError: unsupported operand in training" in line
    assert "run with --debug for the traceback" in line
    with pytest.raises(TypeError):
        main(["--debug", "diff", "--model", f"{models}:buggy", "--batch", "2", "--input-shape", "3,8,8"])


def test_an_exception_with_an_empty_message_is_named_by_its_type(monkeypatch, capsys) -> None:
    import densenet_debug.cli.info as info

    def run(args):
        raise KeyError()

    monkeypatch.setattr(info, "run", run)
    assert main(["info"]) == 3
    assert "internal error: KeyError (run with --debug" in _one_line(capsys.readouterr().err)


def test_every_verb_help_lists_its_exit_codes() -> None:
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    assert set(verbs) >= {"diff", "gradcheck", "oracle", "record", "check-reference", "selftest", "sweep",
                          "canary", "train", "plot", "graph", "info"}
    for name, sub in verbs.items():
        text = " ".join(sub.format_help().split())
        for code in ("0 ", "1 ", "2 bad input or environment", "3 internal error", "130 interrupted"):
            assert "exit codes:" in text and code in text.split("exit codes:")[1], (name, code)


# -- exclusive writers -----------------------------------------------------------------------------------------
def _as_at_a_terminal() -> None:
    """In the child before exec: Ctrl-C's default action, as at an interactive terminal. A child of a background
    job (``cmd &``, nohup) inherits SIGINT ignored, and the program rightly keeps that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_paused(argv: list[str], point: str, seconds: float = 120) -> subprocess.Popen:
    proc = subprocess.Popen(CLI + argv, env={**ENV, PAUSE: f"{point}:{seconds}"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_as_at_a_terminal)
    deadline = time.monotonic() + 120
    line = ""
    while not line.startswith(f"paused at {point}"):
        assert proc.poll() is None, f"exited {proc.returncode} before pausing: {proc.stderr.read()[-800:]}"
        assert time.monotonic() < deadline
        line = proc.stdout.readline()
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    proc.stdout.close(), proc.stderr.close()


def test_two_records_of_the_same_name_one_wins_the_other_names_it(tmp_path: Path) -> None:
    out = tmp_path / "fx"
    argv = ["record", "--name", "same", "--out-dir", str(out), *TINY_RECORD]
    first = _start_paused(argv, "locked")  # holds the lock, has not written anything yet
    try:
        second = subprocess.run(CLI + argv, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"pid {first.pid} on " in _one_line(second.stderr) and "recorded" not in second.stdout
        first.send_signal(signal.SIGKILL)  # dies holding the lock: a stale lock file stays behind
        first.wait()
    finally:
        _kill(first)
    assert (out / ".same.lock").exists() and not (out / "same").exists()
    assert main(argv) == 0  # the next writer (in this process: no race left to run) takes the stale lock over
    assert sorted(p.name for p in out.iterdir()) == ["same"]  # lock taken over, then released


def test_two_trainings_of_the_same_directory_one_wins_the_other_names_it(tmp_path: Path) -> None:
    save = tmp_path / "run"
    argv = ["train", *TINY_TRAIN, "--save", str(save)]
    first = _start_paused(argv, "locked")
    try:
        second = subprocess.run(CLI + argv, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"pid {first.pid} on " in _one_line(second.stderr)
    finally:
        _kill(first)
    assert not save.exists() or not any(save.iterdir())  # the loser wrote nothing
    assert main(argv) == 0  # the winner's lock was released with its process
    rows = (save / "test.csv").read_text().splitlines()
    assert rows[1:] and [r.split(",")[0] for r in rows[1:]] == ["1"]  # each epoch once


# -- atomic replace --------------------------------------------------------------------------------------------
def test_record_force_killed_mid_replace_leaves_a_whole_fixture(tmp_path: Path) -> None:
    from densenet_debug import atomic
    from densenet_debug.reference.meta import read_meta

    (tmp_path / "x").mkdir(), (tmp_path / "y").mkdir()
    if not atomic.exchange(tmp_path / "x", tmp_path / "y"):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here; the fallback is tested in tests/test_atomic.py")
    out = tmp_path / "fx"
    base = ["record", "--name", "r2", "--out-dir", str(out), *TINY_RECORD]
    assert main(base) == 0  # the fixture to replace; only the replace that is killed needs its own process
    old_seed = read_meta(out / "r2")["data"]["generation"]["seed"]
    proc = _start_paused(base + ["--force", "--seed", "7"], "exchanged")
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        _kill(proc)
    # Killed after the swap, before the old copy was removed: the new fixture is whole under the name.
    assert read_meta(out / "r2")["data"]["generation"]["seed"] == 7 != old_seed
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".r2.") and p.name != ".r2.lock"]
    assert leftovers and read_meta(out / leftovers[0])["data"]["generation"]["seed"] == old_seed
    assert main(base + ["--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["r2"]  # leftovers and stale lock gone


def test_checkpoint_temporaries_of_a_killed_run_are_removed_on_resume(tmp_path: Path) -> None:
    save = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "--save", str(save)]) == 0
    torn = [save / ".checkpoint.pt.a1b2c3d4.pt", save / ".train.csv.x9y8z7w6.tmp"]
    for p in torn:
        p.write_bytes(b"torn")
    assert main(["train", *TINY_TRAIN, "--save", str(save), "--resume", "--epochs", "2"]) == 0
    assert not any(p.exists() for p in torn)
    assert sorted(p.name for p in save.iterdir()) == ["checkpoint.pt", "config.json", "test.csv", "train.csv"]


# -- SIGINT --------------------------------------------------------------------------------------------------
def _assert_interrupted(proc: subprocess.Popen, out: Path) -> None:
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == -signal.SIGINT and not stderr.strip() and "recorded" in stdout:
        # The work was done and reported, and Ctrl-C hit the interpreter's own shutdown, where Python has put
        # SIGINT back to its default action (no code of ours runs then): the fixture must be whole.
        from densenet_debug.reference.meta import read_meta

        read_meta(out / "n")
        return
    # 130, or death by SIGINT itself, which a shell also reports as $? = 130: CPython re-raises SIGINT at exit
    # when the KeyboardInterrupt passed through code run by PyRun_* (pybind11's exec in torch's import), even
    # though main() handled it.
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, stderr[-800:])
    assert stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in stderr
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if left == ["n"]:  # torch swallowed the KeyboardInterrupt while importing and the recording ran on: whole
        from densenet_debug.reference.meta import read_meta

        read_meta(out / "n")
    else:
        assert left == [] and "recorded" not in stdout  # no fixture, no temporary, no lock


@pytest.mark.parametrize("entry", ["console-script", "python -m"])
def test_sigint_while_importing_is_interrupted_exit_130(entry: str, tmp_path: Path) -> None:
    """The moment the CLI's first module runs, before torch is imported: the start-up handler answers."""
    exe = Path(sys.executable).with_name("densenet-debug")
    if entry == "console-script" and not exe.exists():
        pytest.skip("the console script is not installed in this environment")
    out = tmp_path / "fx"
    cmd = [str(exe)] if entry == "console-script" else CLI
    proc = subprocess.Popen(cmd + ["record", "--name", "n", "--out-dir", str(out), *TINY_RECORD],
                            env={**ENV, PAUSE: "startup:60"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_as_at_a_terminal)
    assert proc.stdout.readline().strip() == "paused at startup"
    proc.send_signal(signal.SIGINT)
    _assert_interrupted(proc, out)


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5, 2.2, 3.0])
def test_sigint_at_any_moment_is_interrupted_exit_130_and_nothing_half_written(delay: float,
                                                                                tmp_path: Path) -> None:
    """From imports (torch takes seconds) through model building, recording and the publishing of the fixture.

    (The first ~0.1 s is the Python interpreter's own start-up, site and .pth files, before any code of
    this package can run; a Ctrl-C there is Python's.)
    """
    out = tmp_path / "fx"
    proc = subprocess.Popen(CLI + ["record", "--name", "n", "--out-dir", str(out), *TINY_RECORD[:-1], "3,32,32",
                                   "--batch", "4"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_as_at_a_terminal)
    time.sleep(delay)
    if proc.poll() is not None:
        pytest.skip(f"record finished within {delay} s on this machine")
    proc.send_signal(signal.SIGINT)
    _assert_interrupted(proc, out)


def test_sigint_while_holding_the_lock_releases_it_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "fx"
    proc = _start_paused(["record", "--name", "n", "--out-dir", str(out), *TINY_RECORD], "locked")
    proc.send_signal(signal.SIGINT)
    _assert_interrupted(proc, out)


# -- resume ------------------------------------------------------------------------------------------------------
def test_resume_with_fewer_epochs_than_done_is_refused_and_config_untouched(tmp_path: Path, capsys) -> None:
    save = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "--save", str(save), "--epochs", "2"]) == 0
    before = {p.name: p.read_bytes() for p in save.iterdir()}
    capsys.readouterr()
    assert main(["train", *TINY_TRAIN, "--save", str(save), "--resume", "--epochs", "1"]) == 2
    assert "already run 2 epochs" in _one_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in save.iterdir()} == before
    assert main(["train", *TINY_TRAIN[:-1], "--save", str(save), "--resume", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "done: 2 epochs" in out and "nan" not in out  # a finished run reports its last test row


@pytest.mark.parametrize(("damage", "fragment"), [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: __import__("torch").save({"format": "densenet-debug/checkpoint/1", "epoch": 1}, p),
     "checkpoint field 'model'"),
    (lambda p: __import__("torch").save({"format": "densenet-debug/checkpoint/1", "epoch": "one", "model": {},
                                         "optimizer": {}, "scaler": {}, "rng": {}, "config": {}}, p),
     "checkpoint field 'epoch'"),
])
def test_a_bad_checkpoint_is_one_line_naming_the_field(tmp_path: Path, capsys, damage, fragment) -> None:
    save = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "--save", str(save)]) == 0
    damage(save / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", *TINY_TRAIN, "--save", str(save), "--resume", "--epochs", "2"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "checkpoint.pt" in line and fragment in line


@pytest.mark.parametrize(("verb", "damage", "fragment"), [
    ("plot", lambda p: p.write_bytes(p.read_bytes() + b"1,2,0.5,\xff\xfe,1,1,1,1\n"), "is not UTF-8"),
    ("plot", lambda p: p.write_text(p.read_text() + "1,2,0.5,abc,1,1,1,1\n"), "column loss: 'abc' is not a number"),
    ("resume", lambda p: p.write_text(p.read_text() + "one,2,0.5,1,1,1,1,1\n"), "column epoch: 'one'"),
    ("resume", lambda p: p.write_bytes(b"\xff" * 10), "line 1 is not UTF-8"),
])
def test_a_bad_progress_csv_is_one_line_naming_the_file(tmp_path: Path, capsys, verb, damage, fragment) -> None:
    save = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "--save", str(save)]) == 0
    damage(save / "train.csv")
    capsys.readouterr()
    argv = (["plot", str(save), "--out", str(tmp_path / "p.png")] if verb == "plot"
            else ["train", *TINY_TRAIN, "--save", str(save), "--resume", "--epochs", "2"])
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert "train.csv" in line and fragment in line


# -- outputs checked first, format by extension ----------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["diff", "--model", "nope.py:f", "--json", "{bad}"],
    ["diff", "--model", "nope.py:f", "--html", "{bad}"],
    ["gradcheck", "--model", "nope.py:f", "--json", "{bad}"],
    ["oracle", "--model", "nope.py:f", "--json", "{bad}"],
    ["check-reference", "no/such/fixture", "--json", "{bad}"],
    ["selftest", "--faults", "nope", "--json", "{bad}"],
    ["sweep", "cat-conv", "--a", "nope", "--json", "{bad}"],
    ["canary", "--batch", "1", "--json", "{bad}"],
    ["canary", "--batch", "1", "--out", "{bad}.png"],
    ["graph", "--model", "nope.py:f", "--out", "{bad}.dot"],
    ["record", "--model", "nope.py:f", "--name", "x", "--out-dir", "{bad}"],
    ["train", "--model", "nope.py:f", "--save", "{bad}"],
    ["plot", "no/such/dir", "--out", "{bad}.png"],
])
def test_output_paths_are_checked_before_any_work(argv: list[str], tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad = str(blocker / "sub" / "out")
    argv = [a.replace("{bad}", bad) for a in argv]
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert "is not a directory" in line and "a-file" in line  # the path, not the model/fixture/backend


@pytest.mark.parametrize(("argv", "listed"), [
    (["graph", "--model", "densenet-bc-10", "--out", "g.jpeg"], ".dot, .gv, .svg, .png, .pdf"),
    (["canary", "--out", "c.jpeg"], ".png, .svg, .pdf"),
    (["plot", ".", "--out", "p.gif"], ".png, .svg, .pdf"),
])
def test_an_unsupported_extension_is_one_line_listing_the_supported(argv, listed, tmp_path, capsys,
                                                                    monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert listed in _one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_graph_dot_is_dot_text(tmp_path: Path) -> None:
    out = tmp_path / "g.gv"
    assert main(["graph", "--model", "densenet-bc-10", "--input-shape", "3,8,8", "--out", str(out)]) == 0
    assert out.read_text().startswith("digraph ")


@pytest.mark.parametrize("suffix", [".svg", ".pdf", ".png"])
def test_canary_figure_format_follows_the_extension(suffix: str, tmp_path: Path) -> None:
    from densenet_debug.faults.canary import save_figure

    report = _tiny_canary_report()
    save_figure(report, tmp_path / f"c{suffix}")
    head = (tmp_path / f"c{suffix}").read_bytes()[:200]
    assert {".svg": b"<svg", ".pdf": b"%PDF", ".png": b"\x89PNG"}[suffix] in head


def _tiny_canary_report():
    from densenet_debug.faults.canary import CanaryReport, Run

    clean = Run("clean", losses=[2.0, 1.0, 0.5, 0.2], accuracy=[0.5, 0.95])
    faulty = Run("faulty", losses=[2.0, 1.9, 1.8, 1.8], accuracy=[0.2, 0.3])
    return CanaryReport(target=0.9, clean=clean, faulty=faulty, localization=None,
                        config={"model": "densenet-bc-16"})


# -- README and --help agree -----------------------------------------------------------------------------------
def test_several_layers_and_backends_after_one_flag() -> None:
    parser = build_parser()
    args = parser.parse_args(["gradcheck", "--layer", "a", "b", "--layer", "c"])
    assert args.layer == ["a", "b", "c"]
    args = parser.parse_args(["check-reference", "fx", "--backend", "native", "mkldnn", "--backend", "fp64"])
    assert args.backend == ["native", "mkldnn", "fp64"]


@pytest.mark.parametrize("verb", ["diff", "gradcheck", "oracle", "record", "check-reference", "selftest", "sweep",
                                  "canary", "train", "info"])
def test_every_compute_verb_takes_threads(verb: str) -> None:
    sub = build_parser()._subparsers._group_actions[0].choices[verb]
    assert any("--threads" in a.option_strings for a in sub._actions)


# -- tables in pipes ----------------------------------------------------------------------------------------------
def test_gradcheck_table_through_a_pipe_at_80_columns_is_whole(models: Path) -> None:
    done = subprocess.run(CLI + ["gradcheck", "--model", f"{models}:rootmath", "--batch", "2"],
                          env={**ENV, "COLUMNS": "80", "TERM": "xterm"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    out = done.stdout
    assert "…" not in out and "..." not in out.split("first culprit")[0]
    row = next(line for line in out.splitlines() if line.startswith("(model)"))
    assert "weight_with_a_long_descriptive_name" in row and "FAIL" in row  # explained by the Function below
    cells = row.split()
    assert all(c.count("e") <= 1 for c in cells[2:4]) and cells[2].endswith(("e-01", "e+00", "e-02"))
    last = out.strip().splitlines()[-1]
    assert last.startswith("FAIL:") and "first culprit: _Wrong (custom Function <w, J v>)" in last


def test_plain_table_keeps_every_cell_and_strips_markup() -> None:
    from rich.table import Table

    from densenet_debug.table import plain_lines

    t = Table(title="t")
    t.add_column("name")
    t.add_column("value", justify="right")
    t.add_row("block3.layer16.conv2.weight", "[red]7.3456e-05[/]")
    t.add_row("x", "1")
    lines = plain_lines(t)
    assert lines[0] == "t" and lines[1].split() == ["name", "value"]
    assert lines[3] == "block3.layer16.conv2.weight  7.3456e-05" and lines[4].endswith("  1")
    assert json.dumps(lines).count("[red]") == 0


def test_sigint_mid_training_leaves_a_resumable_directory_and_no_temporaries(tmp_path: Path) -> None:
    save = tmp_path / "run"
    argv = ["train", *TINY_TRAIN[:-4], "--synthetic-size", "256", "--batch-size", "16", "--epochs", "3",
            "--no-plot", "--quiet", "--save", str(save)]
    proc = subprocess.Popen(CLI + argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_at_a_terminal)
    log, deadline = save / "train.csv", time.monotonic() + 120
    while not (log.exists() and any(line.startswith("2,") for line in log.read_text().splitlines())):
        assert proc.poll() is None, proc.stderr.read()[-800:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (130, -signal.SIGINT) and stderr.strip().splitlines()[-1] == "interrupted", stderr[-800:]
    assert not (tmp_path / ".run.lock").exists()
    assert not [p.name for p in save.iterdir() if p.name.startswith(".")]
    assert all(line.count(",") == 7 for line in log.read_text().splitlines())  # whole rows only
    assert main([*argv, "--resume"]) == 0
    assert [r.split(",")[0] for r in (save / "test.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]
