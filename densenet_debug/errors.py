"""The exception types the CLI turns into one-line messages, and the wording of those lines.

Exit codes (README "Exit codes"): 0 agree/pass, 1 a finding, 2 bad input or environment (:class:`UsageError`,
a path, memory), 3 an internal error (a bug in this tool), 130 interrupted.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user (a flag, a path, a file). The CLI prints ``error: <message>`` and exits 2."""


class LockedError(UsageError):
    """Another live process is writing the same fixture or training directory (exit 2, naming it)."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name when the message is empty."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def describe(exc: BaseException) -> str:
    """``TypeName: first line`` (just the type name when there is no message)."""
    line = first_line(exc)
    return line if line == type(exc).__name__ else f"{type(exc).__name__}: {line}"


_ALLOCATION = ("DefaultCPUAllocator: can't allocate memory", "out of memory", "CUDA out of memory",
               "can't allocate memory", "Cannot allocate memory", "std::bad_alloc")


def is_allocation_failure(exc: BaseException) -> bool:
    """A failed memory allocation: MemoryError, torch's OutOfMemoryError, or an allocator's RuntimeError."""
    if isinstance(exc, MemoryError):
        return True
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc)
        return any(marker in text for marker in _ALLOCATION)
    return False
