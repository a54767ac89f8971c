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


# -- exchange, leftovers, locks -----------------------------------------------------------------------------
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from densenet_debug.errors import LockedError  # noqa: E402


def test_replacing_a_directory_swaps_it_in_one_step_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "fx"
    for content in ("old", "new"):
        with atomic.writing_dir(target) as d:
            (d / "meta.json").write_text(content)
    assert (target / "meta.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fx"]  # no temp dir, no .old, no lock file


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_exchange_swaps_two_directories(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("A"), (b / "x").write_text("B")
    assert atomic.exchange(a, b)
    assert (a / "x").read_text() == "B" and (b / "x").read_text() == "A"


def test_leftovers_of_killed_writers_are_removed_but_similar_names_kept(tmp_path: Path) -> None:
    target = tmp_path / "fx"
    target.mkdir()
    junk = [tmp_path / ".fx.k2j4h5g6", tmp_path / ".fx.old", tmp_path / ".fx.ab12cd34.pt"]
    junk[0].mkdir(), junk[1].mkdir(), junk[2].write_text("torn")
    keep = [tmp_path / ".fx.other.k2j4h5g6", tmp_path / "fx2", tmp_path / ".fx2.k2j4h5g6"]
    keep[0].mkdir(), keep[1].mkdir(), keep[2].mkdir()
    removed = atomic.clean_leftovers(target)
    assert sorted(removed) == sorted(junk) and not any(p.exists() for p in junk) and all(p.exists() for p in keep)


def test_a_fallback_replace_killed_between_renames_is_put_back_by_the_next_writer(tmp_path: Path) -> None:
    """Without renameat2: old renamed aside, SIGKILL before the new one is renamed in; the next writer restores."""
    target = tmp_path / "fx"
    with atomic.writing_dir(target) as d:
        (d / "meta.json").write_text("old")
    code = ("import sys; from pathlib import Path; from densenet_debug import atomic\n"
            "atomic.exchange = lambda a, b: False\n"
            "with atomic.writing_dir(Path(sys.argv[1])) as d:\n"
            "    (d / 'meta.json').write_text('new')\n")
    env = {**os.environ, "DENSENET_DEBUG_TEST_PAUSE_IN_REPLACE": "between-renames:60"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "paused at between-renames"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not target.exists() and (tmp_path / ".fx.old" / "meta.json").read_text() == "old"
    with atomic.exclusive(target):  # a stale lock of the killed process: taken over
        atomic.clean_leftovers(target)
    assert (target / "meta.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fx"]


def test_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path: Path) -> None:
    target = tmp_path / "fx"
    code = ("import sys; from densenet_debug import atomic\n"
            "with atomic.exclusive(sys.argv[1]):\n    pass\n")
    env = {**os.environ, "DENSENET_DEBUG_TEST_PAUSE_IN_REPLACE": "locked:60"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "paused at locked"
        with pytest.raises(LockedError, match=rf"pid {proc.pid} on "):
            with atomic.exclusive(target):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    lock = atomic.lock_path(target)
    assert lock.exists()  # the killed holder could not clean up
    with atomic.exclusive(target) as held:
        import json

        record = json.loads(held.read_text())
        assert record["pid"] == os.getpid() and record["taken_over_from"] == proc.pid
        with atomic.exclusive(target):  # the same process may nest
            pass
    assert not lock.exists()


@pytest.mark.parametrize(("setup", "kwargs", "fragment"), [
    (lambda p: p.mkdir(), {}, "is a directory"),
    (lambda p: p.parent.joinpath("file").write_text("x"), {"name": "file/out.json"}, "is not a directory"),
    (lambda p: None, {"suffixes": (".png", ".svg")}, "use one of .png, .svg"),
    (lambda p: p.write_text("x"), {"directory": True}, "is not a directory"),
])
def test_check_output_refuses_unwritable_targets(tmp_path: Path, setup, kwargs, fragment) -> None:
    from densenet_debug.errors import UsageError

    name = kwargs.pop("name", "out.json")
    p = tmp_path / name
    setup(tmp_path / "out.json")
    with pytest.raises(UsageError, match=fragment):
        atomic.check_output(p, "--json", **kwargs)
    assert not (tmp_path / "deep").exists()


def test_check_output_accepts_a_creatable_path_and_creates_nothing(tmp_path: Path) -> None:
    atomic.check_output(tmp_path / "a" / "b" / "out.json", "--json")
    atomic.check_output(tmp_path / "work", "--save", directory=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_check_output_refuses_a_read_only_directory(tmp_path: Path) -> None:
    from densenet_debug.errors import UsageError

    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(UsageError, match="permission denied"):
        atomic.check_output(ro / "sub" / "out.json", "--json")


def test_the_same_target_spelled_differently_is_one_lock_in_one_process(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path)
    with atomic.exclusive(tmp_path / "a" / "fx"), atomic.writing_dir(Path("a") / ".." / "a" / "fx") as d:
        (d / "meta.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["fx"]


def test_an_exception_between_the_fallback_renames_puts_the_old_directory_back(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "fx"
    with atomic.writing_dir(target) as d:
        (d / "meta.json").write_text("old")
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)

    def interrupt(point: str) -> None:
        if point == "between-renames":
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_test_pause", interrupt)
    with pytest.raises(KeyboardInterrupt), atomic.writing_dir(target) as d:
        (d / "meta.json").write_text("new")
    assert (target / "meta.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fx"]
