"""Per-op teacher forcing (issue 12): every aten op of a side's step replayed on the fp64 oracle's inputs.

:func:`judge_ops` captures the oracle's float64 step and the side's step (:mod:`densenet_debug.capture`), aligns
the op streams, replays each side op on the oracle's inputs in the side's dtype and exact layout under the
side's flags, and compares with the oracle's output against the op's derived bound
(:mod:`densenet_debug.verdict.ops.errors`). Rows are :class:`~densenet_debug.verdict.report.Row` records with
``mode="op"`` and ``layer="<module> · <aten op>"``; :func:`rollup` gives one row per module.
"""

from densenet_debug.verdict.ops.judge import OpKink, OpReport, Unmatched, judge_ops, module_of, oracle_capture, rollup

__all__ = ["OpKink", "OpReport", "Unmatched", "judge_ops", "module_of", "oracle_capture", "rollup"]
