"""The verdict engine: a backend against an fp64 oracle, unit by unit, with derived tolerances.

``engine`` drives a diff (oracle traces, sides, report); ``local`` and ``propagated`` build the rows;
``replay`` and ``counterfactual`` re-run units; ``tolerance``, ``magnitude``, ``compare`` and ``kinks`` hold the
error models; ``report`` and ``render`` present the result; ``bisect`` and ``sweep`` are drivers built on it.
"""

from __future__ import annotations

from densenet_debug._lazy import lazy_exports

_EXPORTS = {name: "densenet_debug.verdict.engine"
            for name in ("diff", "judge", "judge_many", "local_check", "oracle_traces", "summarize")}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
