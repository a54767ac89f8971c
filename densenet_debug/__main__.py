import signal
import sys

if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # Ctrl-C while importing: no traceback
    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("interrupted\n"), sys.stderr.flush(),
                                             __import__("os")._exit(130)))

from densenet_debug.cli import main  # noqa: E402

raise SystemExit(main())
