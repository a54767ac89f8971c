"""CSV progress logs: header, flushed rows, truncation on resume (later epochs and torn lines dropped)."""

from __future__ import annotations

import pytest

from densenet_debug.errors import UsageError
from densenet_debug.training.progress import TRAIN_COLUMNS, CsvLog, ProgressLogs


def _log(tmp_path) -> CsvLog:
    return CsvLog(tmp_path / "t.csv", ("epoch", "x"))


def test_header_then_rows_flushed_as_written(tmp_path):
    log = _log(tmp_path)
    log.append([1, 0.5])
    assert (tmp_path / "t.csv").read_text() == "epoch,x\n1,0.5\n"  # visible before close: flushed per row
    log.append([2, 1.25])
    log.close()
    assert [r["x"] for r in log.rows()] == ["0.5", "1.25"]
    with pytest.raises(ValueError, match="2 columns"):
        _log(tmp_path).append([1, 2, 3])


def test_truncate_keeps_epochs_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("epoch,x\n1,a\n1,b\n2,c\n3,d\n3,e")  # "3,e" was being written when the process died
    log = _log(tmp_path)
    assert [r["x"] for r in log.rows()] == ["a", "b", "c", "d"]
    assert log.truncate(2) == 3
    assert path.read_text() == "epoch,x\n1,a\n1,b\n2,c\n"
    log.append([3, "f"])
    assert path.read_text().endswith("2,c\n3,f\n")
    assert log.truncate(0) == 0 and path.read_text() == "epoch,x\n"


def test_foreign_header_is_refused(tmp_path):
    (tmp_path / "t.csv").write_text("partialEpoch,loss,err\n0.0,2.3,90\n")  # the seed's headerless style
    with pytest.raises(UsageError, match="not a file this version wrote"):
        _log(tmp_path).rows()


def test_progress_logs_truncate_only_existing_files(tmp_path):
    logs = ProgressLogs(tmp_path)
    logs.train.append([1, 1, 0.0, 2.3, 90.0, 0.1, 100.0, 1.0])
    logs.close()
    logs.truncate(0)
    assert (tmp_path / "train.csv").read_text() == ",".join(TRAIN_COLUMNS) + "\n"
    assert not (tmp_path / "test.csv").exists() and not (tmp_path / "audit.csv").exists()
