"""Plotting progress: smoothing over an epoch, figure contents from a recorded CSV, the plot verb."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from densenet_debug.cli import main
from densenet_debug.training.plot import plot_progress, progress_figure, read_progress, smooth
from densenet_debug.training.progress import ProgressLogs


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(0.01, 100), min_size=1, max_size=50), window=st.integers(1, 60))
def test_smooth_is_a_trailing_mean(values, window):
    out = smooth(np.array(values), window)
    assert out.shape == (len(values),)
    for i in range(len(values)):
        lo = max(0, i + 1 - window)
        assert out[i] == pytest.approx(np.mean(values[lo:i + 1]), rel=1e-9)


def _record(workdir, batches_per_epoch: int, epochs: int, last_partial: int = 0) -> None:
    """A run as train writes it: rows per batch, a test row per completed epoch."""
    logs = ProgressLogs(workdir)
    for e in range(1, epochs + 2):
        n = batches_per_epoch if e <= epochs else last_partial
        for b in range(n):
            loss = 2.0 / (e + b / batches_per_epoch)
            logs.train.append([e, b + 1, f"{e - 1 + b / batches_per_epoch:.6f}", loss, 50.0 / e, 0.1, 1000.0, 1.0])
        if e <= epochs:
            logs.test.append([e, 2.2 / e, 55.0 / e, 2.0 / e, 50.0 / e, 0.1, 1.5])
    logs.close()


@pytest.mark.parametrize("batches, epochs, partial", [(7, 3, 2), (1, 1, 0), (3, 0, 2), (782, 2, 5)])
def test_figure_from_a_recorded_run(tmp_path, batches, epochs, partial):
    _record(tmp_path, batches, epochs, partial)
    train, test = read_progress(tmp_path)
    fig = progress_figure(train, test)
    loss_ax, err_ax = fig.axes
    assert loss_ax.get_yscale() == "log" and err_ax.get_yscale() == "log"
    lines = {line.get_label().split(" ")[0]: line for line in loss_ax.lines}
    assert np.allclose(lines["train"].get_ydata(), smooth(train["loss"], batches))  # window = one epoch
    assert lines["train"].get_xdata()[-1] == pytest.approx(train["partial_epoch"][-1] + 1 / batches)
    if epochs:
        assert np.allclose(lines["test"].get_xdata(), np.arange(1, epochs + 1))
        assert np.allclose([line for line in err_ax.lines if line.get_label() == "test"][0].get_ydata(),
                           55.0 / np.arange(1, epochs + 1))
    out = plot_progress(tmp_path)
    assert out == tmp_path / "loss-error.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zero_error_does_not_break_the_log_axis(tmp_path):
    logs = ProgressLogs(tmp_path)
    logs.train.append([1, 1, 0.0, 0.5, 0.0, 0.1, 10.0, 1.0])
    logs.test.append([1, 0.4, 0.0, 0.5, 0.0, 0.1, 1.0])
    logs.close()
    fig = progress_figure(*read_progress(tmp_path))
    assert fig.axes[1].get_yscale() == "linear" and fig.axes[0].get_yscale() == "log"
    assert plot_progress(tmp_path, tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")


def test_plot_verb(tmp_path, capsys):
    _record(tmp_path, 4, 2, 1)
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").exists() and capsys.readouterr().out.strip() == str(tmp_path / "x.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv in (["plot", str(empty)], ["plot", str(tmp_path / "missing")], ["plot", str(tmp_path), "--out", "a.gif"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("densenet-debug plot: error:") and err.count("\n") == 1
