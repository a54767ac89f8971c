"""Training progress on disk: CSV logs that survive a crash, and the console (rich progress bar).

``train.csv`` has one row per batch, ``test.csv`` one per epoch, ``audit.csv`` one per layer group per audit.
Every file has a header and an ``epoch`` column (1-based). Rows are appended and flushed one at a time, so a
killed run loses at most the line being written; on resume :meth:`CsvLog.truncate` drops the rows of epochs
after the checkpoint (and any torn last line), so the files hold each epoch exactly once. A file that is not
UTF-8, or a row whose epoch is not a positive integer, is refused in one line naming the file and line.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from densenet_debug import atomic
from densenet_debug.errors import UsageError

# The seed's columns first (partial epoch, loss, error in percent), then what we add.
TRAIN_COLUMNS = ("epoch", "batch", "partial_epoch", "loss", "error_pct", "lr", "images_per_s", "grad_norm")
TEST_COLUMNS = ("epoch", "loss", "error_pct", "train_loss", "train_error_pct", "lr", "seconds")
AUDIT_COLUMNS = ("epoch", "step", "backend", "group", "layer", "pass", "quantity", "error", "tolerance", "status")


class CsvLog:
    """An append-only CSV file with a fixed header; each row is flushed to the OS as it is written."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str]) -> None:
        self.path = Path(path)
        self.columns = tuple(columns)
        self._file: io.TextIOWrapper | None = None

    def truncate(self, last_epoch: int) -> int:
        """Keep the header and the rows with epoch <= ``last_epoch`` (atomically); return the rows kept."""
        kept = [row for row in self.rows() if int(row["epoch"]) <= last_epoch]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows([row[c] for c in self.columns] for row in kept)
        atomic.write_text(self.path, buf.getvalue())
        return len(kept)

    def rows(self) -> list[dict[str, str]]:
        """Complete rows of the file (a torn last line, without its newline, is not one)."""
        if not self.path.exists():
            return []
        try:
            text = self.path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            line = self.path.read_bytes()[: exc.start].count(b"\n") + 1
            raise UsageError(f"{self.path}: line {line} is not UTF-8 text; not a file this tool wrote") from None
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        lines = text.splitlines()
        if not lines:
            return []
        header = next(csv.reader([lines[0]]))
        if tuple(header) != self.columns:
            raise UsageError(f"{self.path}: header {','.join(header)} is not {','.join(self.columns)}; "
                             f"not a file this version wrote")
        rows = []
        for number, r in enumerate(csv.reader(lines[1:]), start=2):
            if len(r) != len(header):
                continue
            row = dict(zip(header, r))
            try:
                if int(row["epoch"]) < 1:
                    raise ValueError
            except ValueError:
                raise UsageError(f"{self.path}: line {number}, column epoch: {row['epoch']!r} is not an epoch "
                                 f"number") from None
            rows.append(row)
        return rows

    def append(self, values: Iterable[object]) -> None:
        if self._file is None:
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", newline="")
            if fresh:
                self._file.write(",".join(self.columns) + "\n")
        row = [_fmt(v) for v in values]
        if len(row) != len(self.columns):
            raise ValueError(f"{self.path.name}: {len(row)} values for {len(self.columns)} columns")
        self._file.write(",".join(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


class ProgressLogs:
    """The three CSV logs of a work directory."""

    def __init__(self, workdir: str | os.PathLike) -> None:
        workdir = Path(workdir)
        self.train = CsvLog(workdir / "train.csv", TRAIN_COLUMNS)
        self.test = CsvLog(workdir / "test.csv", TEST_COLUMNS)
        self.audit = CsvLog(workdir / "audit.csv", AUDIT_COLUMNS)

    def truncate(self, last_epoch: int) -> None:
        for log in (self.train, self.test, self.audit):
            if log.path.exists():
                log.truncate(last_epoch)

    def close(self) -> None:
        for log in (self.train, self.test, self.audit):
            log.close()


class ConsoleProgress:
    """A rich progress bar over an epoch's batches (drawn on a terminal only) plus one summary line per epoch."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task = None

    def start_epoch(self, epoch: int, epochs: int, total: int) -> None:
        if not self.enabled or not self.console.is_terminal:
            return
        self._progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, stats="")

    def advance(self, loss: float, error_pct: float, images_per_s: float) -> None:
        if self._progress is not None:
            stats = f"loss {loss:.4f} err {error_pct:5.2f}% {images_per_s:7.1f} img/s"
            self._progress.update(self._task, advance=1, stats=stats)

    def end_epoch(self, line: str) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.enabled:
            self.console.print(line, highlight=False, soft_wrap=True)

    def note(self, line: str) -> None:
        if self.enabled:
            self.console.print(line, highlight=False, soft_wrap=True)
