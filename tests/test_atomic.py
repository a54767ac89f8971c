"""Atomic writes leave either the old content or the new, never a half-written file or directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from densenet_debug import atomic


def test_write_text_replaces_whole(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "a.json"
    atomic.write_text(p, "one")
    atomic.write_text(p, "two")
    assert p.read_text() == "two"
    assert [x.name for x in p.parent.iterdir()] == ["a.json"]


def test_failed_directory_write_leaves_old_content(tmp_path: Path) -> None:
    target = tmp_path / "fixture"
    with atomic.writing_dir(target) as d:
        (d / "x.npz").write_text("old")
    with pytest.raises(RuntimeError), atomic.writing_dir(target) as d:
        (d / "x.npz").write_text("new, half done")
        raise RuntimeError("crash mid-write")
    assert (target / "x.npz").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixture"]


def test_failed_file_write_leaves_old_content(tmp_path: Path) -> None:
    p = tmp_path / "c.csv"
    p.write_text("old")
    with pytest.raises(RuntimeError), atomic.writing_file(p) as tmp:
        tmp.write_text("new")
        raise RuntimeError
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["c.csv"]


def test_written_files_get_the_umask_mode_not_owner_only(tmp_path: Path) -> None:
    import os

    mask = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "a.csv", "x")
        with atomic.writing_file(tmp_path / "b.png") as tmp:
            tmp.write_bytes(b"png")
        with atomic.writing_dir(tmp_path / "fixture") as d:
            (d / "meta.json").write_text("{}")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.csv").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.png").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "fixture").stat().st_mode & 0o777 == 0o755
