from densenet_debug.cli import main

raise SystemExit(main())
