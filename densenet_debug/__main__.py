import os
import signal
import sys


def _interrupted_early(signum, frame):
    """Ctrl-C while importing (torch takes seconds): nothing written yet; main() replaces this handler."""
    for stream in (sys.stdout, sys.stderr):  # after main() returned, its output must not be lost
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: nothing more to save
            pass
    sys.stderr.write("interrupted\n")
    sys.stderr.flush()
    os._exit(130)


_interrupted_early.early = True
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_early)

from densenet_debug.cli import main  # noqa: E402

raise SystemExit(main())
