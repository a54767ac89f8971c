"""Atomic writes and exclusive writers: a file or directory appears whole or not at all, one writer at a time.

* Files are written to a temporary name beside the target and ``os.replace``-d over it.
* A directory (a fixture) is written beside the target and swapped in with ``renameat2(RENAME_EXCHANGE)``
  (Linux): the old and the new directory trade names in one step, so a kill at any moment leaves the old
  fixture or the new one under the name, never nothing. Where the call is missing, the old directory is first
  renamed to ``.NAME.old`` and the next writer puts it back if a kill came between the two renames.
* :func:`exclusive` is a lock per target (``.NAME.lock`` beside it, ``flock``-ed, holding the pid and host):
  a second writer fails at once naming the holder; a lock left by a killed process is free again (the kernel
  drops ``flock`` with the process) and is taken over.
* Leftovers of killed writers (``.NAME.xxxxxxxx`` temporary files and directories, ``.NAME.old``) are removed
  by the next writer holding the lock; readers open targets by name only, so they never read them as data.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from densenet_debug.errors import LockedError, UsageError

# Set only by tests, as POINT[:SECONDS]: sleep at that point (``locked``: just after taking a writer's lock;
# ``exchanged``: after a directory swap, before the old one is removed; ``between-renames``: between the two
# renames of the fallback), so a test can race or SIGKILL a real process exactly there.
_PAUSE_ENV = "DENSENET_DEBUG_TEST_PAUSE_IN_REPLACE"
_LEFTOVER = re.compile(r"^[A-Za-z0-9_]{8}(\.[A-Za-z0-9]+)?$|^old$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publishable(path: str | os.PathLike, directory: bool = False) -> None:
    """mkstemp/mkdtemp create owner-only entries; give the final file the mode a plain open() would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _test_pause(point: str) -> None:
    value = os.environ.get(_PAUSE_ENV)
    if value and value.split(":")[0] == point:
        print(f"paused at {point}", flush=True)
        time.sleep(float(value.split(":")[1]) if ":" in value else 30.0)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publishable(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


@contextmanager
def writing_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (for writers that want a name)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix or ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _publishable(tmp)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


# -- directory replace --------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    """libc's renameat2, or None (not Linux, old glibc)."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths' names in one atomic step; False when the system cannot (the caller falls back)."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(os.fspath(a)), _AT_FDCWD, os.fsencode(os.fspath(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # filesystem or kernel without it
        return False
    raise OSError(err, os.strerror(err), os.fspath(a))


def clean_leftovers(target: str | os.PathLike) -> list[Path]:
    """Remove temporaries of killed writers of ``target`` (``.NAME.xxxxxxxx[.ext]``, ``.NAME.old``).

    Call only while holding :func:`exclusive` on ``target``: then no live writer owns them. A directory
    replace killed between its two fallback renames left the old version only in ``.NAME.old``: it is put back.
    """
    target = Path(target)
    parent, prefix = target.parent, f".{target.name}."
    old = parent / f"{prefix}old"
    if old.is_dir() and not target.exists():
        os.replace(old, target)
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        if p.name.startswith(prefix) and _LEFTOVER.match(p.name[len(prefix):]):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextmanager
def writing_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole (see module doc)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(target):
        clean_leftovers(target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            yield tmp
            _publishable(tmp, directory=True)
            _fsync_dir(tmp)
            if not target.exists():
                os.replace(tmp, target)
            elif exchange(tmp, target):  # target is now the new directory, tmp the old one
                _test_pause("exchanged")
            else:
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
                _test_pause("between-renames")
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            _fsync_dir(target.parent)
        finally:
            old = target.with_name(f".{target.name}.old")
            if not target.exists() and old.is_dir():  # interrupted between the fallback's renames: put it back
                os.replace(old, target)
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- exclusive writers ----------------------------------------------------------------------------------------
_HELD: dict[Path, int] = {}  # lock path -> depth, so a writer may nest (the CLI locks, then writing_dir)


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.lock"


def _holder(path: Path) -> dict:
    for _ in range(20):  # the winner writes its pid right after locking; give it a moment
        try:
            data = json.loads(path.read_text() or "null")
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and "pid" in data:
            return data
        time.sleep(0.01)
    return {}


@contextmanager
def exclusive(target: str | os.PathLike, what: str | None = None) -> Iterator[Path]:
    """Hold the writer's lock of ``target`` (``.NAME.lock`` beside it) or raise :class:`LockedError` naming the
    holder. A lock file left by a killed process is taken over (``flock`` died with it)."""
    import fcntl

    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path = Path(os.path.realpath(path.parent)) / path.name  # one key per directory, however it is spelled
    if path in _HELD:  # this process already holds it
        _HELD[path] += 1
        try:
            yield path
        finally:
            _HELD[path] -= 1
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            h = _holder(path)
            who = f"pid {h.get('pid', '?')} on {h.get('host', '?')}" if h else "another process"
            raise LockedError(f"{what or Path(target)} is being written by {who} (lock {path}); wait for it to "
                              f"finish or stop it") from None
        try:  # the file we locked may have been unlinked by a holder releasing it: then lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _holder_now(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "taken_over_from": stale}).encode())
    _HELD[path] = 1
    try:
        _test_pause("locked")
        yield path
    finally:
        del _HELD[path]
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # unlink before unlocking: a waiter re-checks the inode and relocks the new file


def _holder_now(fd: int) -> int | None:
    """The pid left in the lock file by a holder that died without releasing it (a clean release unlinks the
    file), i.e. the stale lock being taken over; None for a fresh lock."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
    return data.get("pid") if isinstance(data, dict) else None


# -- output paths -----------------------------------------------------------------------------------------------
def check_output(path: str | os.PathLike | None, flag: str, suffixes: tuple[str, ...] | None = None,
                 directory: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written: a directory where a file is wanted (or
    a file where a directory is), an unsupported extension, a parent that is not a directory or cannot be
    created, or no write permission. Nothing is created."""
    if path is None:
        return
    p = Path(path)
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path}: unsupported extension {p.suffix or '(none)'!r}; use one of "
                         f"{', '.join(suffixes)}")
    if p.exists():
        if directory and not p.is_dir():
            raise UsageError(f"{flag} {path} exists and is not a directory")
        if not directory and p.is_dir():
            raise UsageError(f"{flag} {path} is a directory, not a file")
        if not os.access(p, os.W_OK):
            raise UsageError(f"{flag} {path}: permission denied")
    ancestor = p.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write in {ancestor} (permission denied)")
