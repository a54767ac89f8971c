"""One round of ``bench.py diff --baseline``: a child process that times a plain-pass anchor and a full diff
with whichever ``densenet_debug`` is first on its path (this checkout's, or the baseline checkout's), on the
same model and batch, and prints one JSON line.

It imports only what every version of the package has had (``models.build_model``, ``backends.parse_backend``,
a ``diff`` in ``verdict.engine`` or ``verdict``), and draws the batch itself from seed 0, so that a checkout
from before this bench existed is timed on the very same inputs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diff import _plain_pass  # noqa: E402


def main(argv: list[str]) -> None:
    model_name, batch, threads, a, b, repeat = argv[0], int(argv[1]), int(argv[2]), argv[3], argv[4], int(argv[5])
    import torch

    import densenet_debug
    from densenet_debug.backends import parse_backend
    from densenet_debug.models import build_model

    try:
        from densenet_debug.verdict.engine import diff
    except ImportError:  # before the verdict package was split
        from densenet_debug.verdict import diff

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(model_name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)

    backends = [parse_backend(a), parse_backend(b), parse_backend("fp64", "cpu")]
    prepared = [bk.prepare_model(model) for bk in backends]
    # diff.py's plain pass (that module imports nothing of the package at its top: either version can use it)
    anchor = sum(min(_plain_pass(bk, m, x, y) for _ in range(repeat + 1)) for bk, m in zip(backends, prepared))
    del prepared
    diff(model, x, y, a, b)  # warm-up
    seconds = min(_timed(diff, model, x, y, a, b) for _ in range(repeat))
    print(json.dumps({"package": densenet_debug.__file__, "anchor_seconds": anchor, "diff_seconds": seconds,
                      "ratio": seconds / anchor}))


def _timed(diff, *args: object) -> float:  # noqa: ANN001
    start = time.perf_counter()
    diff(*args)
    return time.perf_counter() - start


if __name__ == "__main__":
    main(sys.argv[1:])
