"""``python -m densenet_debug``: the same as the ``densenet-debug`` script (Ctrl-C handled from the start)."""

from densenet_debug.cli import main

raise SystemExit(main())
