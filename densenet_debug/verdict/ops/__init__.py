"""Per-op teacher forcing (issue 12): every aten op of a side's step replayed on the fp64 oracle's inputs.

:func:`judge_ops` captures the oracle's float64 step and the side's step (:mod:`densenet_debug.capture`), aligns
the op streams, replays each side op on the oracle's inputs in the side's dtype and exact layout under the
side's flags, and compares with the oracle's output against the op's derived bound
(:mod:`densenet_debug.verdict.ops.errors`). Rows are :class:`~densenet_debug.verdict.report.Row` records with
``mode="op"`` and ``layer="<module> · <aten op>"`` (`` #k`` for the k-th call of that op in that module);
:func:`rollup` gives one row per module. :func:`add_ops` / :func:`merge_ops` make both sides' op rows rows of
a diff report (one verdict, ``first_divergence`` naming the op; :mod:`densenet_debug.verdict.ops.merge`).
"""

from densenet_debug.verdict.ops.judge import OpKink, OpReport, Unmatched, judge_ops, module_of, oracle_capture, rollup
from densenet_debug.verdict.ops.merge import add_ops, merge_ops

__all__ = ["OpKink", "OpReport", "Unmatched", "add_ops", "judge_ops", "merge_ops", "module_of", "oracle_capture",
           "rollup"]
