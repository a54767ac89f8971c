"""Plot a work directory's progress: loss and error, train (smoothed over an epoch) and test, log y.

The seed's ``plot.py`` drew two figures and joined them with ImageMagick; its fixed 784-batch window
assumed batch 64 and drew nothing before epoch 2. Here: one PNG with both panels, drawn with matplotlib's
Agg canvas (no pyplot state, no GUI, no subprocess), a window equal to the batches in an epoch that
widens from the first row, so any batch size and any number of rows works.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from densenet_debug import atomic
from densenet_debug.errors import UsageError
from densenet_debug.training.progress import TEST_COLUMNS, TRAIN_COLUMNS, CsvLog

FILENAME = "loss-error.png"
SUFFIXES = (".png", ".svg", ".pdf")


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` rows; the first rows average what exists so far (same length out)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    window = max(1, min(int(window), values.size))
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def read_progress(workdir: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``train.csv`` and ``test.csv`` of a work directory as columns of floats."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UsageError(f"{workdir} is not a directory")
    train = _columns(CsvLog(workdir / "train.csv", TRAIN_COLUMNS).rows(), TRAIN_COLUMNS, workdir / "train.csv")
    test = _columns(CsvLog(workdir / "test.csv", TEST_COLUMNS).rows(), TEST_COLUMNS, workdir / "test.csv")
    if train["epoch"].size == 0 and test["epoch"].size == 0:
        raise UsageError(f"{workdir} has no progress rows yet (train.csv, test.csv)")
    return train, test


def _columns(rows: list[dict[str, str]], names: tuple[str, ...], path: Path | str = "progress file",
             ) -> dict[str, np.ndarray]:
    out = {}
    for n in names:
        values = []
        for i, r in enumerate(rows):
            try:
                values.append(float(r[n]))
            except ValueError:
                raise UsageError(f"{path}: row {i + 1}, column {n}: {r[n]!r} is not a number") from None
        out[n] = np.array(values, dtype=np.float64)
    return out


def batches_per_epoch(train: dict[str, np.ndarray]) -> int:
    """Batches in a full epoch: the most rows any epoch has, or what a partial epoch's rows imply.

    Row b of an epoch of T batches has partial_epoch = epoch - 1 + (b - 1) / T, so a first, unfinished epoch
    already tells T.
    """
    if train["epoch"].size == 0:
        return 1
    _, counts = np.unique(train["epoch"], return_counts=True)
    frac = train["partial_epoch"] - (train["epoch"] - 1)
    later = (train["batch"] > 1) & (frac > 0)
    implied = np.rint((train["batch"][later] - 1) / frac[later]) if later.any() else np.zeros(1)
    return int(max(counts.max(), implied.max()))


def progress_figure(train: dict[str, np.ndarray], test: dict[str, np.ndarray], title: str = ""):
    """A matplotlib Figure (Agg canvas) with the loss panel and the error panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.style import context
    from matplotlib.ticker import FuncFormatter

    window = batches_per_epoch(train)
    with context("bmh"):
        fig = Figure(figsize=(12, 5), layout="constrained")
        FigureCanvasAgg(fig)
        panels = (("loss", "Cross-entropy loss"), ("error_pct", "Error (%)"))
        for ax, (column, label) in zip(fig.subplots(1, 2), panels):
            train_y = smooth(train[column], window)
            if train_y.size:
                # x = partial epoch + 1/total: a batch is drawn where it finished, on the test rows' scale.
                ax.plot(train["partial_epoch"] + 1.0 / window, train_y, label=f"train (mean of last {window} "
                        f"batches)", lw=1.2)
            if test["epoch"].size:
                ax.plot(test["epoch"], test[column], "o-", label="test", lw=1.2, ms=3)
            if np.any(np.concatenate([train_y, test[column]]) > 0):
                ax.set_yscale("log", nonpositive="mask")
                plain = FuncFormatter(lambda v, _: f"{v:g}")
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(plain)
            ax.set_xlabel("Epoch")
            ax.set_ylabel(label)
            ax.legend()
        if title:
            fig.suptitle(title)
    return fig


def plot_progress(workdir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the loss/error figure (default ``WORKDIR/loss-error.png``) and return its path."""
    out = Path(out) if out is not None else Path(workdir) / FILENAME
    if out.suffix.lower() not in SUFFIXES:
        raise UsageError(f"cannot write {out}: use a {', '.join(SUFFIXES)} file name")
    train, test = read_progress(workdir)
    fig = progress_figure(train, test, title=Path(workdir).resolve().name)
    with atomic.writing_file(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".").lower(), dpi=100)
    return out
