"""The one exception type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user (a flag, a path, a file). The CLI prints ``error: <message>`` and exits 2."""
