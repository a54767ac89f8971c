"""Teacher forcing of the code *between* units: the ops a model runs outside its leaf units.

Local rows (:mod:`densenet_debug.verdict.local`) replay each unit on the oracle's inputs; nothing replays the
code that carries one unit's output to the next unit's input (``torch.cat``, ``F.relu``, a custom
``autograd.Function``, a residual sum written in a ``forward``) or, in backward, one unit's grad_input to the
grad_output of the unit before it. A fault there (a custom Function whose backward scales a channel in
float32 only) leaves every unit self-consistent at the wrong values it is handed, so neither local nor
propagated rows can name it. This module checks that code, forward and backward, on the side's own values.

**The run.** The float64 model of the step runs once more with every *cut* unit's first call replaced by
the side's recorded output of that call, cast to float64 (exact: every side dtype embeds in float64), as a
fresh leaf that requires grad. What then arrives at each unit is ``fp64(between(side's unit outputs))``:

* forward: it is compared with the side's recorded inputs of that unit;
* backward: one VJP of the same graph, seeded with each cut unit's recorded grad_inputs at the inputs it
  was handed (each read when autograd reaches that unit: :class:`_Cut`), and at the model's output with the
  side's own loss gradient (the loss replayed in the side's dtype and backend on the side's recorded output:
  the loss is no unit and no between code of the model), gives the grad_output each unit should have
  received; it is compared with the side's recorded one.

Cut units are the leaf units (units with no unit inside them) that the side recorded; a unit that writes
into its input (``inplace=True``: ReLU, Hardtanh, Dropout ...) is not cut but runs in float64 as between code
(its op is exact on the side's values) and is still checked at its input and grad_output. Composite units'
own math (the top-level ``forward``, a dense layer's ``torch.cat``) *is* between code.

**The bound (derived, deterministic, first order).** The between code is a composition of aten ops. Every
op is classified (:func:`rounding`): data movement, ReLU-like selections and comparisons are exact (``k = 0``:
on the same operands, float32 and float64 give the same number); an elementwise arithmetic op rounds once
(``k = 1``: IEEE add, sub, mul, div, sqrt, casts are correctly rounded); an elementwise function PyTorch computes
as a short composition (sigmoid ``1/(1+exp(-x))``, silu ``x·sigmoid(x)``, softplus, tanh, the ``*_backward``
formulas) rounds at each of at most four steps, each within one ulp (SLEEF's ``u10`` exp/log/tanh in the
vectorized CPU kernels, IEEE arithmetic otherwise), with no cancellation between them on these forms (``k = 4``:
:data:`COMPOSED_ROUNDINGS`; GELU's kernel evaluates erf by a polynomial of unstated accuracy, measured beyond
that, so it counts as an op of unknown accuracy, below); a reduction of K terms per result (sum, mean, pooling,
softmax) has worst-case error
``(K - 1) u sum|terms| <= K u sum|terms|`` (``k = K``); any other op (convolution, matmul, batch norm: an
unselected module or a later call of a unit inside the between code) gets the generic rule of
:mod:`densenet_debug.verdict.tolerance` for unknown units, ``K = all input elements`` (``k = K``). For ops linear
in each operand, an error ``e <= c u M_in`` entering an op of Jacobian J leaves ``|J| e <= c u |J| M_in``, and
the op adds ``k u M_out``; since the magnitude evaluation (:class:`~densenet_debug.verdict.magnitude.MagnitudeMode`:
the same code on ``|values|``, ``sub`` as ``add``) propagates ``M_out = |J| M_in`` exactly, the error of any
tensor is at most ``c u M`` with the *rounding count* ``c = max over operands of c + k`` tracked along the
graph (:class:`_Tracker`), forward and backward (autograd's accumulation of fan-out gradients is an ``add``:
``k = 1`` each). The side and this float64 run each round so, so a check allows

    ``|side - expected| <= c (u_side + 2^-53) M + c eta``

with ``u_side`` the coarsest unit roundoff among the side's values of that check and ``eta`` the underflow
of the side's dtype. ``c = 0`` (cat, slicing, view, ReLU, a flatten: the usual case) means bit-exact. For
ops not linear in their operands (exp, division) ``M`` is the op at the magnitudes, a heuristic stated by
:mod:`~densenet_debug.verdict.magnitude`. No probability enters: a correct backend cannot fail this check to first
order. The model's output seed (a replay of the side's loss) carries ``c = 1``: one rounding of slack for a
loss kernel that does not reproduce itself bit for bit.

*The magnitudes without a magnitude run.* When every op of the values' run has a Jacobian with no negative
entry (data movement, sums and means, average pools, additions, selections by a mask: :func:`_sign_free`), no
forward check rounds and no piecewise op decided on a rounded operand, the backward's magnitudes are one more
backward of the same graph seeded with the seeds' absolute values: ``J^T |g| = |J|^T |g|`` when ``J >= 0``, and
that is what the magnitude run computes on ``|values|`` (the same sums of the same terms; a test compares them).
A DenseNet's between code is such: concatenations, and autograd's sums of the gradients its fan-out sends back.

**Kinks.** A piecewise op that decides on a unit's recorded output (``F.relu(self.bn(x))`` between units) sees
the side's own values (``c = 0``) and takes the side's branch: no kink there. One that decides on a value the
between code itself rounded (``F.relu((h + t) - c)``, ``F.relu(h - h.mean())``, a residual sum before a
max-pool, clamp or ``where``) may not: the side's float32 operand and this run's float64 one differ by up to
the bound above, so where the float64 operand lies within it of the boundary the side may have taken either
branch, and the expected grad_output differs by a whole gradient term (``O(|g|)``), far beyond any rounding
bound. Handled as follows (:class:`~densenet_debug.verdict.magnitude.Branches`, coverage that of
:mod:`~densenet_debug.verdict.inner_kinks`: relu/threshold, leaky ReLU, clamp/hardtanh, ``maximum``/``minimum``,
abs, the comparisons ``gt``/``ge``/``lt``/``le``/``eq``/``ne`` under ``where``/``masked_fill``, 2-d max-pool ties):

* *Ambiguous elements (derived).* The values' run keeps the signed coordinate ``z`` of every such call whose
  operands round (``c > 0``; :func:`densenet_debug.capture.kinks.signed_coordinate`: zero on the boundary,
  ``x - bound`` per clamp bound, ``a - b`` for comparisons and maximum). The side's operand is within
  ``c (u_side + 2^-53) M + c eta`` of this run's (the bound above, ``M`` the operand's magnitude, ``M_a + M_b``
  for two operands; ``u_side``/``eta`` the coarsest roundoff/underflow among the dtypes the side's between code
  computes in), so an element can lie on the other side of the boundary exactly when
  ``|z| <= c (u_side + 2^-53) M_z + c eta``. A max-pool window is ambiguous when two of its elements differ by
  at most ``2 c (u_side + 2^-53) max M + 2 c eta`` (the sum of both elements' bounds); each such element is a
  candidate argmax.
* *Forward, continuous ops.* Relu, leaky ReLU, clamp, maximum and abs are 1-Lipschitz, and a tied max-pool
  picks values within the bound, so the side's output is within the operand's bound of this run's. The
  magnitude run takes, at ambiguous elements, the larger magnitude of either branch (``M`` where a ReLU
  blocks, ``max(M, |bound|)`` for a clamp, the window's largest for a pool), so the bound downstream stays
  ``c (u_side + 2^-53) M``.
* *Backward: the kink allowance.* An op that routes a gradient by such a decision (``threshold_backward``,
  ``leaky_relu_backward``, ``hardtanh_backward``, a ``where``/``masked_fill`` on an ambiguous comparison, a
  gradient times ``sgn``, a max-pool's backward by its indices) may route it the other way at those
  elements: its result changes there by at most its *jump*, ``D = M_g`` (``|1 - slope| M_g`` for leaky ReLU,
  ``2 M_g`` through ``sgn``, ``M_a + M_b`` for ``where``, a window's ``M_g`` at each candidate of a pool).
  To first order the flips add linearly, and a change ``D`` entering the rest of the backward (Jacobian
  ``J``) leaves at most ``|J^T| D`` at each unit. That is one more magnitude run, the *allowance run*: the
  same forward, every seed zero, and each routing op's jump (recorded by the magnitude run) added to its
  result; what reaches a unit is its allowance ``A`` (0 wherever no ambiguous element reaches it). A check
  that fails ``c (u_side + 2^-53) M + c eta`` but passes ``c (u_side + 2^-53) M + c eta + A`` is status ``kink`` (the
  row keeps its error against the rounding bound; not a finding, ``--fail-on kink`` makes it one); one that
  fails both is a mismatch. A wrong gradient elsewhere in the tensor, or larger than the jumps, still
  fails: only the ambiguous elements' routes are widened, by what flipping them can change.
* *Forward jumps.* A ``where`` choosing between different values on an ambiguous comparison (jump
  ``<= M_a + M_b``), or ``threshold`` with a value other than its threshold (``<= M + |value|``), changes the
  forward value itself. The allowance run also adds these jumps to its forward magnitudes; a forward check's
  allowance is what then arrives at the unit less the magnitude run's arrival, ``F(M + D) - F(M) >= |dF| D``
  for the nondecreasing evaluation on magnitudes (a product's cross terms only add; for ops not linear in
  their operands the same heuristic as ``M`` itself). The backward of this run then runs at ``M + D``:
  larger, never smaller, Jacobian magnitudes. The ambiguous elements are the magnitude run's, kept per call.
* *Not covered* (they excuse nothing, so such a row still fails): a comparison's boolean cast to a number
  and multiplied, clamps with tensor bounds, max-pool with ``ceil_mode``, 1-d/3-d and adaptive max pools,
  ``max``/``min``/``sort``/``topk`` over a dimension.

**Modules called twice.** The trace records a unit's first call only; that call is cut. Later calls run in
float64 on what they are handed, as between code, and their ops are counted like any other (a conv called
twice adds its generic ``k``; a batch norm's magnitudes come from its aten decomposition, whose
``x - mean`` then adds, not from its fused kernel on |values|, which cancels): downstream checks stay
sound, only looser. Inside a checkpointed region the recompute of a cut unit returns a fresh copy of the
same recorded output (so gradients reach the cut); a unit called more than once inside a checkpointed region
is recomputed in float64 instead (documented limitation: its gradient then
bypasses the cut, and its grad_output check is left out).

**Findings** are rows of mode ``between``: ``input`` (forward, at the consuming unit) and ``grad_output``
(backward, at the producing unit), with a note naming the producing units, the consuming unit and the
module whose ``forward`` ran the code. :func:`between_rows` judges a side; the same run on the stored truth of
a fixture (side = the fixture's float64 records) checks that the model's between code still reproduces it
(:func:`densenet_debug.reference.check.check_reference`).
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from densenet_debug._autograd import in_backward
from densenet_debug.backends import U64, Backend, unit_roundoff
from densenet_debug.errors import is_allocation_failure
from densenet_debug.trace import Trace
from densenet_debug.verdict.compare import Comparison, compare
from densenet_debug.verdict.local import ancestors
from densenet_debug.verdict.magnitude import _PASS, Branches, MagnitudeMode
from densenet_debug.verdict.report import STATUS_ORDER, Row, Status
from densenet_debug.verdict.tolerance import underflow

MODE = "between"
BETWEEN_ORIGIN = ("between units: the model's code outside its leaf units, re-run in fp64 on the side's own unit "
                  "outputs (forward) and grad_inputs (backward); bound c*(u_side + 2^-53)*sum|terms| with c the "
                  "rounding count of that code (0 = exact: cat, slicing, view, ReLU must match bit for bit), plus a "
                  "kink allowance where a piecewise op decides within that bound of its boundary (status kink)")

# Ops that give the same number in any float dtype on the same operands (selection, comparison, movement).
EXACT_OPS = _PASS | {
    "relu", "threshold", "threshold_backward", "where", "abs", "neg", "sign", "le", "lt", "ge", "gt", "eq", "ne",
    "logical_and", "logical_or", "logical_not", "logical_xor", "maximum", "minimum", "clamp", "clamp_min",
    "clamp_max", "hardtanh", "hardtanh_backward", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "masked_select", "isnan", "isinf", "isfinite", "any", "all", "argmax", "argmin",
    "max", "min", "amax", "amin", "sort", "topk", "squeeze", "constant_pad_nd", "roll", "flip", "repeat",
    "index_put", "scatter", "new_zeros", "zero", "bitwise_and", "bitwise_or", "bitwise_not", "detach_",
    "_unsafe_index", "pad", "reflection_pad2d", "replication_pad2d", "_local_scalar_dense", "diagonal",
    "view_as_real", "tril", "triu", "resize_", "masked_scatter", "unfold", "im2col", "col2im_exact",
}
# One rounding per result element.
ELEMENTWISE_OPS = {
    "add", "sub", "rsub", "mul", "div", "addcmul", "addcdiv", "exp", "exp2", "log", "log2", "log1p", "expm1",
    "sqrt", "rsqrt", "reciprocal", "pow", "sigmoid", "tanh", "sigmoid_backward", "tanh_backward", "leaky_relu",
    "leaky_relu_backward", "elu", "elu_backward", "silu", "silu_backward", "softplus",
    "softplus_backward", "lerp", "hardswish", "hardswish_backward", "hardsigmoid", "hardsigmoid_backward",
    "mish", "sin", "cos", "erf", "fill", "_to_copy", "copy", "square", "xlogy", "fmod", "remainder",
    "log_sigmoid_forward", "log_sigmoid_backward", "rrelu_with_noise", "prelu", "_prelu_kernel",
    "_prelu_kernel_backward", "clone",
}
# (GELU is not among them: its float32 CPU kernel evaluates erf by a polynomial of its own, whose accuracy
# PyTorch does not state; measured up to 6.06 u M forward and 8.99 u M backward (2M points on [-8, 8], torch
# 2.13), beyond the 4 steps of one ulp above. An op of unknown accuracy takes the generic rule, as unknown
# units do.)
# One IEEE-rounded step each (k = 1); every other elementwise op is a composition of <= 4 (module docstring).
CORRECTLY_ROUNDED = {"add", "sub", "rsub", "mul", "div", "sqrt", "reciprocal", "square", "fmod", "remainder",
                     "leaky_relu", "prelu", "_prelu_kernel", "rrelu_with_noise", "lerp"}
COMPOSED_ROUNDINGS = 4.0
# Reductions over a dimension that keep the shape (softmax family): K = that dimension's size plus its ops.
SAME_SHAPE_REDUCTIONS = {"_softmax", "_log_softmax", "_softmax_backward_data", "_log_softmax_backward_data",
                         "cumsum", "logcumsumexp"}
# Reductions whose K is the ratio of input to output elements (sum, mean, pooling and their backward).
RATIO_REDUCTIONS = {"sum", "mean", "avg_pool1d", "avg_pool2d", "avg_pool3d", "avg_pool2d_backward",
                    "avg_pool3d_backward", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
                    "_adaptive_avg_pool2d_backward", "adaptive_avg_pool3d", "_adaptive_avg_pool3d",
                    "_adaptive_avg_pool3d_backward", "max_pool2d_with_indices_backward",
                    "max_pool3d_with_indices_backward", "prod", "norm", "linalg_vector_norm", "var", "std",
                    "var_mean", "std_mean", "logsumexp", "nansum", "sum_to_size", "expand_backward"}


def inexact_scalars(func: object, args: tuple, kwargs: dict) -> int:
    """How many of an op's floating scalar arguments (given, or left at their schema default: leaky ReLU's
    slope) a narrow dtype cannot hold exactly: the side's kernel casts each to its dtype, one rounding more
    (``x * 0.1`` in float32 is ``fl(x * fl(0.1))``: two roundings, not one). Held exactly means in both
    bfloat16 and float16, so the count does not depend on which dtype the side computes in."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return 0
    n = 0
    for i, arg in enumerate(schema.arguments):
        # a Scalar ("number"), a float, or a Python number where a Tensor goes (``x * 0.1``: a wrapped number)
        if i < len(args):
            value = args[i]
        elif arg.name in kwargs:
            value = kwargs[arg.name]
        elif arg.has_default_value() and str(arg.type) in ("number", "float"):
            value = arg.default_value
        else:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        n += not _held_exactly(value)
    return n


@functools.cache
def _held_exactly(value: float) -> bool:
    """Both bfloat16 and float16 hold ``value`` exactly (memoised: the tracker asks at every op call)."""
    return all(float(torch.tensor(value, dtype=d)) == value for d in (torch.bfloat16, torch.float16))


def rounding(func: object, tensors: list[Tensor], outputs: list[Tensor], scalars: int = 0) -> float:
    """``k`` of one aten op (see the module docstring): 0 exact, 1 elementwise, K for a reduction of K terms,
    and the generic ``K = all input elements`` of :mod:`densenet_debug.verdict.tolerance` for anything else;
    plus ``scalars`` (:func:`inexact_scalars`) where the op's result is floating (a clamp to 0.1 returns the
    side's ``fl(0.1)``; a product by 0.1 rounds the scalar, then the product)."""
    if scalars and any(o.is_floating_point() for o in outputs):
        return _rounding(func, tensors, outputs) + scalars
    return _rounding(func, tensors, outputs)


def _rounding(func: object, tensors: list[Tensor], outputs: list[Tensor]) -> float:
    name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
    name = name.rstrip("_") if name not in EXACT_OPS else name
    if name in EXACT_OPS:
        if name in ("index_put", "scatter") and len(tensors) > 2:  # accumulate=True adds
            return 1.0
        return 0.0
    if name in ELEMENTWISE_OPS:
        if name in ("_to_copy", "copy", "clone", "fill"):  # a cast rounds only into a narrower dtype
            src = [t for t in tensors if t.is_floating_point()]
            dst = [o for o in outputs if o.is_floating_point()]
            widest = max((unit_roundoff(t.dtype) for t in src), default=0.0)
            return 1.0 if dst and unit_roundoff(dst[0].dtype) > widest else 0.0
        return 1.0 if name in CORRECTLY_ROUNDED else COMPOSED_ROUNDINGS
    out_numel = max((o.numel() for o in outputs), default=1) or 1
    in_numel = max((t.numel() for t in tensors), default=1)
    if name in SAME_SHAPE_REDUCTIONS:
        dim = tensors[0].dim() if tensors else 1
        return float(max(tensors[0].shape[-1] if dim else 1, 1) + 3) if tensors else 1.0
    if name in RATIO_REDUCTIONS:
        return float(max(1, math.ceil(in_numel / out_numel)) + 1)
    return float(max(1, sum(t.numel() for t in tensors)))


# Ops whose Jacobian has no negative entry (data movement, selections by a recorded mask, sums and means,
# average pools, additions; creations have none): for a graph made of them alone, a backward seeded with |seeds|
# computes |J|^T |seeds| exactly, the magnitudes the magnitude run would give (:func:`_sign_free`).
_SIGN_FREE_OPS = frozenset({
    "cat", "stack", "slice", "slice_backward", "select", "select_backward", "narrow", "split", "split_with_sizes",
    "chunk", "unbind", "view", "_unsafe_view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "permute",
    "transpose", "t", "expand", "expand_as", "clone", "contiguous", "detach", "alias", "_to_copy", "copy", "to",
    "lift_fresh", "as_strided", "zeros", "zeros_like", "new_zeros", "empty", "empty_like", "new_empty",
    "empty_strided", "new_empty_strided", "fill", "zero", "relu", "threshold_backward", "sum", "mean",
    "avg_pool2d", "avg_pool2d_backward", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
    "_adaptive_avg_pool2d_backward", "constant_pad_nd", "index_select", "gather",
})


def _sign_free(func: object, args: tuple, kwargs: dict) -> bool:
    """The op is in :data:`_SIGN_FREE_OPS`, or an addition with a non-negative ``alpha``, or a product or
    quotient by a non-negative Python number (a mean's backward divides by N)."""
    name = getattr(getattr(func, "overloadpacket", None), "__name__", "").rstrip("_")
    if name in _SIGN_FREE_OPS:
        return True
    if name == "add":
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        return isinstance(alpha, (int, float)) and alpha >= 0
    if name in ("mul", "div") and len(args) == 2:
        scalar = args[1]
        return isinstance(scalar, (int, float)) and not isinstance(scalar, bool) and scalar >= 0
    return False


@dataclass(frozen=True)
class _Tag:
    """What the between run knows about a tensor: its rounding count and the units it carries values from
    (forward) or gradients of (backward)."""

    c: float
    src: frozenset


class _Tracker(TorchDispatchMode):
    """Tags every op's outputs with ``c`` (rounding count) and ``src`` (the units whose values or gradients it
    carries). In-place ops bump their whole storage (a write through a view)."""

    def __init__(self, branches: Branches | None = None) -> None:
        super().__init__()
        self.tags: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self.storage_c: dict[int, float] = {}
        # the decisions of piecewise ops, for the magnitude run to take the same branches (verdict.magnitude)
        self.branches = Branches() if branches is None else branches
        self.sign_free = True  # every op seen had a non-negative Jacobian (_sign_free)
        # float64 copies not made yet, by storage: (the tensor, weakly; the side's record it copies), made when an
        # op first reads one (:meth:`defer`)
        self.pending: dict[int, tuple[weakref.ref, Tensor]] = {}
        self.on_fill: Callable[[Tensor], None] | None = None

    def defer(self, t: Tensor, source: Tensor) -> None:
        """``t`` (fresh, uninitialised, float64) is to hold ``source``'s values: copied when an op of the run, or
        the tool's own read (:meth:`fill`), first reads it. A DenseNet hands each unit's output on to the next
        unit as it is, and each unit's grad_input back to the one before: no op of the between code ever reads
        most of them, and their copies were half of the run's time. (Pages of memory never written are not
        mapped, so a copy never made holds no memory either.)"""
        self.pending[_storage(t)] = (weakref.ref(t), source)

    def fill(self, t: Tensor) -> None:
        """Make the deferred copy ``t`` (or the one ``t`` views) now, if it is one."""
        if not self.pending:
            return
        entry = self.pending.pop(_storage(t), None)
        target = entry[0]() if entry is not None else None
        if target is None:
            return
        with _disable_current_modes(), torch.no_grad():
            target.copy_(entry[1])
        if self.on_fill is not None:
            self.on_fill(target)

    def tag(self, t: Tensor) -> _Tag:
        own = self.tags.get(t)
        bump = self.storage_c.get(_storage(t), 0.0)
        if own is None:
            return _Tag(bump, frozenset())
        return own if bump <= own.c else _Tag(bump, own.src)

    def set(self, t: Tensor, tag: _Tag) -> None:
        self.tags[t] = tag

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if self.sign_free and not _sign_free(func, args, kwargs):
            self.sign_free = False
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        if self.pending:  # an op reads (or writes into) these: their deferred copies are due
            for t in ins:
                self.fill(t)
        tags = [self.tag(t) for t in ins]
        c_in = max((t.c for t in tags), default=0.0)
        out = self.branches.run(func, args, kwargs, c_in)  # c_in > 0: its decision may be ambiguous (kinks)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        if not outs:
            return out
        c = c_in + rounding(func, ins, outs, inexact_scalars(func, args, kwargs))
        src = frozenset().union(*(t.src for t in tags)) if tags else frozenset()
        tag = _Tag(c, src)
        name = getattr(getattr(func, "overloadpacket", None), "__name__", "")
        for o in outs:
            self.tags[o] = tag
            if name.endswith("_") and tag.c > 0:  # written in place: every alias of the storage holds it now
                key = _storage(o)
                self.storage_c[key] = max(self.storage_c.get(key, 0.0), tag.c)
        return out


def _storage(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


@dataclass
class _Sample:
    """One checked tensor of the between run: its value, magnitude (filled by the magnitude pass) and tag.

    A bit-exact check (``c = 0``) is compared at once and keeps only its ``comparison``, not the value: a
    DenseNet's concatenations see every earlier feature map, and copies of all of them would grow with the
    square of the depth."""

    value: Tensor | None
    tag: _Tag
    magnitude: Tensor | None = None
    comparison: Comparison | None = None
    allowance: Tensor | None = None  # the kink allowance (module docstring, "Kinks"), where the code has any


@dataclass
class _Data:
    """What a between run needs from a side: unit outputs (cut, in float64), grad_inputs (seeds) and inputs
    (to compare with) as the side recorded them, the output seed, and how often each unit was called."""

    outputs: Mapping[str, list[Tensor]]  # as the side recorded them (float64 copies are made one at a time)
    grad_inputs: Mapping[str, list[Tensor | None]]
    inputs: Mapping[str, list[Tensor | None]]
    grad_outputs: Mapping[str, list[Tensor | None]]
    output_seed: Tensor | None
    calls: dict[str, int]
    spilled: bool = False  # the side's records were (partly) written to disk: read back afresh on each access


class _Records(Mapping[str, list]):
    """One quantity of a side's records, unit by unit, read when asked for: a spilled trace is read back one
    unit at a time instead of whole (BC-100 at batch 16: the between check's peak went 1.9 -> 9.1 GB)."""

    def __init__(self, trace: Trace, field: str, names: list[str]) -> None:
        self.trace, self.field, self.names = trace, field, names

    def __getitem__(self, name: str) -> list:
        if name not in self.names:
            raise KeyError(name)
        return list(getattr(self.trace[name], self.field))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def cut_units(names: list[str], modules: dict[str, nn.Module], s_trace: Trace) -> tuple[list[str], list[str]]:
    """(cut, watched): leaf units the side recorded (cut at their outputs), and those plus in-place units
    (checked at their inputs and grad_outputs, but run in fp64 as between code)."""
    parents = ancestors(names)
    cut, watched = [], []
    for n in names:
        if not n or n in parents or n not in modules or n not in s_trace:
            continue
        rec = s_trace[n]
        if not rec.outputs or any(o is None for o in rec.outputs):
            continue
        watched.append(n)
        if not getattr(modules[n], "inplace", False):
            cut.append(n)
    return cut, watched


def _fp64(t: Tensor | None) -> Tensor | None:
    """A float64 CPU *copy* (never an alias: the records it comes from are a side's or the oracle's truth)."""
    if t is None:
        return None
    return t.detach().to("cpu", torch.float64 if t.is_floating_point() else t.dtype, copy=True)


def side_loss_gradient(s_trace: Trace, y: Tensor, backend: Backend | None, loss_fn: Callable) -> Tensor | None:
    """The side's gradient of the loss at its own recorded output, replayed in its dtype and backend."""
    out = s_trace.output
    if out is None or not out.is_floating_point():
        return None
    with _disable_current_modes():
        z = out.detach().clone().requires_grad_(True)
        active = backend.active() if backend is not None else ExitStack()
        with active, torch.enable_grad():
            (g,) = torch.autograd.grad(loss_fn(z, y.to(z.device) if not y.is_floating_point() else
                                               y.to(z.device, z.dtype)), z)
    return g.detach()


def between_rows(step: int, names: list[str], s_trace: Trace, model64: nn.Module, x: Tensor, y: Tensor,
                 backend: Backend | None, loss_fn: Callable, *, who: str = "") -> list[Row]:
    """The between-check of one side at one step (see the module docstring). ``model64``: the float64 model
    at that step (left as it was); ``x``/``y``: the side's inputs and targets; ``backend``: the side's (its
    loss is replayed under it; None: float64). Rows carry the error in ``error_a``."""
    modules = dict(model64.named_modules())
    cut, watched = cut_units(names, modules, s_trace)
    if not cut:
        return []
    need, free = _held_bytes(s_trace, cut), _available_bytes()
    if s_trace.spilled and free is not None and need > free:
        # The run reads the side's records one unit at a time; what it holds is its float64 graph, at most a
        # float64 copy of every cut unit's output. Measured on BC-100 at batch 8 (mkldnn vs native): the between
        # check raised the peak by 0.46 GB, 0.54x these bytes (0.85 GB). (Reading every record back at once, it
        # was killed by the kernel at 19 GB at batch 64.) A trace kept in memory is within its budget.
        warnings.warn(f"between-units check skipped at step {step}: it would hold about {need / 2**30:.1f} GiB, "
                      f"and {free / 2**30:.1f} GiB of memory is available; check the code between units at a "
                      "smaller batch", stacklevel=2)
        return []
    data = _Data(outputs=_Records(s_trace, "outputs", cut), grad_inputs=_Records(s_trace, "grad_inputs", cut),
                 inputs=_Records(s_trace, "inputs", watched), grad_outputs=_Records(s_trace, "grad_outputs", watched),
                 output_seed=_fp64(side_loss_gradient(s_trace, y, backend, loss_fn)),
                 calls={n: s_trace[n].calls for n in cut}, spilled=s_trace.spilled)
    x64 = _fp64(x)
    try:
        branches = Branches()
        quick: dict[str, _Samples] = {}
        fwd, bwd, callers = _run(model64, modules, cut, watched, data, x64, magnitude=False, branches=branches,
                                 quick=quick)
        _settle_equal(fwd, data.inputs)
        _settle_equal(bwd, data.grad_outputs)
        if not _open(fwd) and _open(bwd) and _covers(quick.get("backward"), _open(bwd)):
            _attach(bwd, quick["backward"])  # every magnitude wanted, without a magnitude run (_run's ``quick``)
        elif _open(fwd) or _open(bwd):  # a check that rounds and differs: its bound needs sum|terms|
            branches.roundoff, branches.eta = _side_roundoff(s_trace, cut, x, backend)
            mfwd, mbwd, _ = _run(model64, modules, cut, watched, data, x64, magnitude=True,
                                 needed=_open(fwd), needed_grads=_open(bwd), branches=branches)
            _attach(fwd, mfwd)
            _attach(bwd, mbwd)
            if branches.injections and (_open(bwd) or _open(fwd)):  # a decision may go either way: allowance
                jumps = branches.forward_jumps
                branches.restart()
                branches.allowance = True
                afwd, abwd, _ = _run(model64, modules, cut, watched, data, x64, magnitude=True,
                                     needed=_open(fwd) if jumps else set(), needed_grads=_open(bwd),
                                     branches=branches, allowance=True)
                _attach(bwd, abwd, "allowance")
                if jumps:  # forward: magnitudes with the jumps added, less those without (module docstring)
                    _attach(fwd, afwd, "allowance")
                    for group in fwd.values():
                        for s in group:
                            if s is not None and s.allowance is not None and s.magnitude is not None:
                                s.allowance = (s.allowance - s.magnitude).clamp_min_(0.0)
    except RuntimeError as exc:  # a model this run cannot re-enter: say so, never crash the verdict
        if is_allocation_failure(exc):  # no room is no pass: the caller reports it (exit 2)
            raise
        warnings.warn(f"between-units check skipped at step {step}: {str(exc).splitlines()[0]}", stacklevel=2)
        return []
    return _rows(step, s_trace, modules, fwd, bwd, callers, backend, who, branches.ambiguous)


@dataclass(frozen=True)
class _Seeder:
    """The unit a :class:`_Cut` stands for, and how its grad_inputs are read (None: a checkpoint's recompute,
    whose graph autograd does not run backward through)."""

    name: str
    read: Callable[[str, list[tuple[int, ...] | None]], list[Tensor | None]] | None


class _Cut(torch.autograd.Function):
    """A cut unit in the float64 run. Forward hands on the side's recorded outputs (float64 copies made by the
    caller); backward hands each input the side's recorded grad_input, read only when autograd reaches the unit
    and released once added in. Seeding every cut unit up front held all their float64 grad_inputs at once
    (BC-100 at batch 16: +2.3 GB). The 0-dim ``zero`` input makes the outputs require grad where no input does
    (the stem's input)."""

    @staticmethod
    def forward(ctx, seeder: _Seeder, zero: Tensor, outs: list[Tensor], *args: object) -> tuple[Tensor, ...]:  # noqa: ANN001
        ctx.seeder = seeder
        ctx.shapes = [tuple(a.shape) if isinstance(a, Tensor) else None for a in args]
        fixed = [o for o in outs if not o.is_floating_point()]
        if fixed:
            ctx.mark_non_differentiable(*fixed)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple:  # noqa: ANN001
        read, name = ctx.seeder.read, ctx.seeder.name
        wanted = [shape if want else None for shape, want in zip(ctx.shapes, ctx.needs_input_grad[3:])]
        if read is None or all(s is None for s in wanted):
            return (None, None, None, *[None] * len(wanted))
        return (None, None, None, *read(name, wanted))


def _available_bytes() -> int | None:
    """Physical memory available now (Linux ``MemAvailable``), None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _held_bytes(s_trace: Trace, cut: list[str]) -> int:
    """Bytes of a float64 copy of every cut unit's recorded outputs: what a between run's graph can hold."""
    return sum(t.numel() * 8 for name in cut for t in s_trace.meta(name).outputs if isinstance(t, Tensor))


_Samples = dict[str, list["_Sample | None"]]


def _open(samples: _Samples) -> set[tuple[str, int]]:
    """The checks still waiting for their magnitudes (those that round)."""
    return {(n, i) for n, group in samples.items() for i, s in enumerate(group)
            if s is not None and s.comparison is None}


def _covers(samples: _Samples | None, wanted: set[tuple[str, int]]) -> bool:
    """``samples`` hold a tensor for every (unit, index) in ``wanted``."""
    if samples is None:
        return False
    for name, i in wanted:
        group = samples.get(name, [])
        if i >= len(group) or group[i] is None:
            return False
    return True


def _settle_equal(samples: _Samples, side: dict[str, list[Tensor | None]]) -> None:
    """A check that rounds but came out bit-equal passes under any bound: settle it without magnitudes."""
    for name, group in samples.items():
        recorded: list | None = None  # read back once per unit, and only if a check is open
        for i, s in enumerate(group):
            if s is None or s.comparison is not None:
                continue
            recorded = side.get(name, []) if recorded is None else recorded
            exact = compare(recorded[i] if i < len(recorded) else None, s.value, None, scaled=False)
            if exact.ratio == 0:
                s.comparison, s.value = exact, None


def _attach(values: dict[str, list[_Sample | None]], mags: dict[str, list[_Sample | None]],
            what: str = "magnitude") -> None:
    for name, group in values.items():
        other = mags.get(name, [])
        for i, s in enumerate(group):
            if s is not None and i < len(other) and other[i] is not None:
                setattr(s, what, other[i].value)


def _side_roundoff(s_trace: Trace, cut: list[str], x: Tensor, backend: Backend | None) -> tuple[float, float]:
    """``(u_side + 2^-53, eta)`` of the side's between code: the coarsest roundoff and underflow among the dtypes
    it computes in (its unit outputs' and input's, and the backend's accumulation)."""
    dtypes = {t.dtype for n in cut for t in s_trace.meta(n).outputs
              if isinstance(t, Tensor) and t.is_floating_point()}
    if x.is_floating_point():
        dtypes.add(x.dtype)
    u = max([unit_roundoff(d) for d in dtypes] + [backend.accumulate_roundoff if backend is not None else 0.0])
    return u + U64, max((2 * underflow(d) for d in dtypes), default=0.0)


def _run(model: nn.Module, modules: dict[str, nn.Module], cut: list[str], watched: list[str], data: _Data,
         x64: Tensor, magnitude: bool, needed: set | None = None, needed_grads: set | None = None,
         branches: Branches | None = None, allowance: bool = False,
         quick: dict[str, _Samples] | None = None) -> tuple[_Samples, _Samples, dict[str, str]]:
    """One float64 forward and VJP of the between code. Returns (inputs arriving at each watched unit,
    grad_outputs each watched unit should receive, as values or magnitudes; the module that called each).
    ``needed``/``needed_grads``: in the magnitude pass, the (unit, index) pairs whose magnitudes are wanted.
    ``branches``: recorded by the values' pass, taken by the magnitude pass (:class:`Branches`). ``allowance``:
    the kink allowance run, a magnitude run whose seeds are zero and whose gradients are what the ambiguous
    decisions inject (module docstring, "Kinks").

    ``quick`` (the values' pass): when every op of the run had a non-negative Jacobian (:func:`_sign_free`),
    no forward check rounds and no piecewise op decided on a rounded operand (no kink is possible), the
    magnitudes of the backward checks that round are one more backward of the same graph seeded with |seeds|:
    ``|J|^T |g| = J^T |g|`` for such a ``J``, the very numbers the magnitude run computes (a DenseNet's between
    code is concatenation and the gradient sums of its fan-out). Left in ``quick["backward"]``; left out
    (the magnitude run then runs) otherwise."""
    stack: list[str] = []
    phase = {"quick": False}  # the second backward, on |seeds| (``quick``)
    quick_grads: _Samples = {}
    tracker = None if magnitude else _Tracker(branches)
    mag = (lambda t: t.abs()) if magnitude else (lambda t: t)
    # What the model gets is a float64 copy of the side's output, made at the call, on which the gradient is
    # read (before any cast back to the side's dtype). The copies enter autograd through one 0-dim leaf
    # (copy + 0 is the copy): nothing full-sized is a leaf (a leaf per output kept each side record alive
    # through the graph and accumulated a .grad of its size).
    zero = torch.zeros((), dtype=torch.float64, requires_grad=True)
    # The float64 copies this run made of the side's records (cut outputs, seeded grad_inputs), by identity:
    # (the copy, its version when made, the side's record it copies). A check whose float64 tensor *is* such a
    # copy, unchanged, against a side tensor that *is* the record it was copied from, is equal by construction
    # (every side dtype embeds exactly in float64): a unit handed the previous unit's output as it is, or its
    # grad_output as the next unit's grad_input. Most checks of a model are such (a DenseNet's: ~90 %), and
    # comparing them read each tensor twice more. A spilled record is read back afresh: never identical, compared.
    # Held weakly: this map keeps neither the copies nor a spilled record's read-back alive.
    made_from: dict[int, tuple[weakref.ref, int, weakref.ref]] = {}
    # The values' run defers its copies (_Tracker.defer) where the side's records live in memory (a spilled
    # record is read back afresh: holding it until an op reads it would hold the whole trace again).
    lazy = tracker is not None and not data.spilled

    def _deferred(b: Tensor) -> Tensor:  # laid out as ``to(float64)`` would lay out the copy
        t = torch.empty_like(b, dtype=torch.float64, device="cpu", memory_format=torch.preserve_format)
        tracker.defer(t, b.detach())
        return t

    def _filled(t: Tensor) -> None:  # a copy made late is still the unchanged copy of its record
        entry = made_from.get(id(t))
        if entry is not None and entry[0]() is t:
            made_from[id(t)] = (entry[0], t._version, entry[2])

    if tracker is not None:
        tracker.on_fill = _filled
    sizes: dict[str, int] = {}
    made: set[str] = set()
    forward: dict[str, list[_Sample | None]] = {}
    grads: dict[str, list[_Sample | None]] = {}
    seen: set[str] = set()
    callers: dict[str, str] = {}  # the module whose forward handed each watched unit its inputs
    handles: list = []
    saved_buffers = {k: b.clone() for k, b in model.named_buffers()}
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    patched: dict[str, object] = {}

    def tag_of(t: Tensor) -> _Tag:
        return tracker.tag(t) if tracker is not None else _Tag(0.0, frozenset())

    def grad_hook(name: str, j: int, n_out: int) -> Callable:
        def hook(g: Tensor | None) -> None:
            if phase["quick"]:  # the magnitudes of the checks the values' backward kept (they round)
                kept = grads.get(name, [])
                if g is not None and j < len(kept) and kept[j] is not None and kept[j].comparison is None:
                    group = quick_grads.setdefault(name, [None] * n_out)
                    if group[j] is None:
                        with _disable_current_modes():
                            group[j] = _Sample(g.detach().clone(), _Tag(0.0, frozenset()))
                return
            group = grads.setdefault(name, [None] * n_out)
            if g is None:  # no gradient reached this output of a multi-output cut (autograd passes None)
                return
            if group[j] is not None:  # several hooks (a recompute) see the same gradient: keep the first
                return
            with _disable_current_modes():
                if magnitude:
                    if (name, j) in (needed_grads or ()):
                        group[j] = _Sample(g.detach().clone(), _Tag(0.0, frozenset()))
                    return
                tag = tag_of(g)
                if tag.c > 0:
                    tracker.fill(g)
                    group[j] = _Sample(g.detach().clone(), tag)
                    return
                recorded = data.grad_outputs[name]
                side = recorded[j] if j < len(recorded) else None
                same = _copied(g, side)
                if same is None:
                    tracker.fill(g)
                group[j] = _Sample(None, tag, comparison=same if same is not None else compare(side, g.detach(), None,
                                                                                               scaled=False))
        return hook

    def _copied(t: Tensor, side: Tensor | None) -> Comparison | None:
        """The exact comparison, without reading either tensor, when ``t`` is this run's unchanged copy of
        ``side`` itself (``made_from``); None when it is not known to be."""
        entry = made_from.get(id(t))
        if side is None or entry is None or entry[0]() is not t or entry[2]() is not side or t._version != entry[1]:
            return None
        return Comparison(0.0, 0.0, 0.0, ())

    def copies(name: str, args: tuple) -> list[Tensor]:
        with _disable_current_modes():  # the tool's own read and copy: exact (every side dtype embeds in float64)
            recorded = data.outputs[name]
            sizes[name] = len(recorded)
            outs = [_deferred(b) if lazy and b.is_floating_point() and b.numel() else
                    mag(b.detach()).to("cpu", torch.float64, copy=True) if b.is_floating_point() else b.to("cpu")
                    for b in recorded]
        first = name not in made and not in_backward()  # not a checkpoint's recompute: its gradient is read
        outs = list(_Cut.apply(_Seeder(name, seed if first else None), zero, outs, *args))
        if not magnitude:
            for o, b in zip(outs, recorded):
                made_from[id(o)] = (weakref.ref(o), o._version, weakref.ref(b))
        if first:
            made.add(name)
            for j, o in enumerate(outs):
                if o.requires_grad:
                    handles.append(o.register_hook(grad_hook(name, j, len(outs))))
        return outs

    def seed(name: str, shapes: list[tuple[int, ...] | None]) -> list[Tensor | None]:
        """The side's grad_inputs of unit ``name`` in float64 (None where the shape differs), read when autograd
        reaches the unit, all at once (a spilled unit's record is read back whole)."""
        with _disable_current_modes():  # the tool's own read: no op of the between code
            recorded = data.grad_inputs[name]
        out: list[Tensor | None] = []
        for i, shape in enumerate(shapes):
            g = recorded[i] if i < len(recorded) else None
            if g is None or shape is None or tuple(g.shape) != shape:
                out.append(None)
                continue
            with _disable_current_modes():
                g64 = torch.zeros(g.shape, dtype=torch.float64) if allowance else (
                    _fp64(g).abs_() if phase["quick"] else
                    _deferred(g) if lazy and g.is_floating_point() and g.numel() else mag(_fp64(g)))
            if tracker is not None and not phase["quick"]:  # several consumers: autograd adds them (counted)
                tracker.set(g64, _Tag(0.0, frozenset({name})))
                made_from[id(g64)] = (weakref.ref(g64), g64._version, weakref.ref(g))
            out.append(g64)
        return out

    def replacement(name: str, original: Callable) -> Callable:
        calls = [0]

        def forward_(*args: object, **kwargs: object) -> object:
            if not in_backward():
                calls[0] += 1
                if calls[0] > 1:  # a later call: float64 between code (see the module docstring)
                    return original(*args, **kwargs)
            elif data.calls.get(name, 1) > 1:
                return original(*args, **kwargs)
            outs = copies(name, args)
            if tracker is not None:
                for o in outs:
                    tracker.set(o, _Tag(0.0, frozenset({name})))
            if len(outs) == 1:
                return outs[0]
            it = iter(outs)
            return tree_map(lambda v: next(it) if isinstance(v, Tensor) else v, original(*args, **kwargs))

        return forward_

    def _arrivals(name: str, args: tuple) -> list[_Sample | None]:
        """What arrived at each input of ``name``: compared now where exact, kept where it rounds."""
        side: list | None = None  # the side's inputs of the unit, read back once (a spilled record is whole)
        out: list[_Sample | None] = []
        for i, a in enumerate(args):
            if not isinstance(a, Tensor):
                out.append(None)
            elif magnitude:
                out.append(_Sample(a.detach().clone(), _Tag(0.0, frozenset())) if (name, i) in (needed or ())
                           else None)
            elif (tag := tag_of(a)).c > 0:  # compared once its magnitude is known; a later in-place op must not
                tracker.fill(a)
                out.append(_Sample(a.detach().clone(), tag))  # change it
            else:
                side = data.inputs[name] if side is None else side
                mine = side[i] if i < len(side) else None
                same = _copied(a, mine)
                if same is None:
                    tracker.fill(a)
                out.append(_Sample(None, tag, comparison=same if same is not None else compare(mine, a.detach(), None,
                                                                                               scaled=False)))
        return out

    def pre(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if name in watched and name not in seen and not in_backward():
                seen.add(name)
                callers[name] = stack[-1] if stack else ""
                with _disable_current_modes():
                    forward[name] = _arrivals(name, args)
            stack.append(name)
        return hook

    def post(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if stack:
                stack.pop()
            if name in watched and name not in cut and name not in grads and not in_backward():
                outs = [o for o in tree_flatten(output)[0] if isinstance(o, Tensor)]
                for j, o in enumerate(outs):
                    if o.requires_grad:
                        handles.append(o.register_hook(grad_hook(name, j, len(outs))))
        return hook

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, module in modules.items():
            if not name:
                continue
            handles.append(module.register_forward_pre_hook(pre(name)))
            handles.append(module.register_forward_hook(post(name)))
        for n in cut:
            module = modules[n]
            patched[n] = module.__dict__.get("forward")
            module.forward = replacement(n, module.forward)
        roots: list[Tensor] = []
        # the tool's own |x| before the modes: an abs under them would be a call the values' run never made
        x_in = mag(x64)
        seed_in = None if data.output_seed is None else (
            torch.zeros_like(data.output_seed) if allowance else mag(data.output_seed))
        seeds: list[Tensor] = []
        with ExitStack() as ctx:
            if tracker is not None:
                ctx.enter_context(tracker)
            else:
                ctx.enter_context(MagnitudeMode(decompose_fused=True, branches=branches))
            ctx.enter_context(torch.enable_grad())
            stack.append("")
            out = model(x_in)
            stack.clear()
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, Tensor)]
            if data.output_seed is not None and len(outs) == 1 and outs[0].requires_grad and \
                    outs[0].shape == data.output_seed.shape:
                seed = seed_in.clone()
                if tracker is not None:
                    tracker.set(seed, _Tag(1.0, frozenset({"the loss"})))
                roots.append(outs[0])
                seeds.append(seed)
            if not (outs and roots and roots[0] is outs[0]):
                grads.clear()  # without the loss's gradient no unit's grad_output is known: no backward check
                return forward, {}, callers
            retain = quick is not None and tracker is not None and tracker.sign_free
            torch.autograd.backward(roots, seeds, retain_graph=retain)
        if retain and tracker.sign_free and not tracker.branches.coordinates and not _open(forward):
            phase["quick"] = True  # outside the tracker: magnitudes, not ops of the between code
            try:
                torch.autograd.backward(roots, [data.output_seed.abs()])
                quick["backward"] = quick_grads
            except RuntimeError:  # a graph that cannot be walked twice (a checkpoint's): the magnitude run
                quick.pop("backward", None)
    finally:
        for h in handles:
            h.remove()
        for n, own in patched.items():
            if own is None:
                del modules[n].forward
            else:
                modules[n].forward = own
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(saved_buffers[k])
    for n in cut:  # a cut output nothing downstream used: it should receive a zero gradient
        if n not in grads:
            grads[n] = [None] * (sizes[n] if n in sizes else len(data.outputs[n]))
    return forward, grads, callers


def _bound(sample: _Sample, u: float, eta: float) -> Tensor | None:
    """``c (u_side + 2^-53) M + c eta``; None (bit-exact) when the code between rounds nothing."""
    c = sample.tag.c
    if c <= 0:
        return None
    m = sample.magnitude if sample.magnitude is not None else sample.value.abs()
    return m * (c * (u + U64)) + c * eta


def _kink_note(ambiguous: dict[str, int]) -> str:
    what = ", ".join(f"{n} {op}" for op, n in sorted(ambiguous.items())) or "some"
    return (f"; kink: {what} element(s) of the code's piecewise ops lie within its rounding bound of their "
            "boundary, where the side may take either branch: within the kink allowance of flipping them")


def _rows(step: int, s_trace: Trace, modules: dict[str, nn.Module], fwd: dict[str, list[_Sample | None]],
          bwd: dict[str, list[_Sample | None]], callers: dict[str, str], backend: Backend | None,
          who: str, ambiguous: dict[str, int] | None = None) -> list[Row]:
    ambiguous = ambiguous or {}
    rows: list[Row] = []
    for name, samples in fwd.items():
        rec = s_trace[name]
        pairs = [(s, rec.inputs[i] if i < len(rec.inputs) else None) for i, s in enumerate(samples)
                 if s is not None]
        row = _row(step, name, "forward", "input", rec.forward_index, pairs, backend)
        if row is not None:
            src = sorted(set().union(*(s.tag.src for s, _ in pairs if s is not None)) - {name})
            starts = [callers[p] for p in src if p in callers]
            row.note = _where(src or ["the model input"], [name], starts, callers.get(name, ""), modules, who)
            if row.status == Status.KINK:
                row.note += _kink_note(ambiguous)
            rows.append(row)
    for name, samples in bwd.items():
        rec = s_trace[name]
        n_out = len(s_trace.meta(name).outputs)  # how many, without reading them back
        pairs = []
        for j in range(n_out):
            s = samples[j] if j < len(samples) else None
            side = rec.grad_outputs[j] if j < len(rec.grad_outputs) else None
            if s is None and side is None:
                continue
            if s is None:  # the between code sends no gradient here: the unit should have received zeros
                s = _Sample(torch.zeros(side.shape, dtype=torch.float64), _Tag(0.0, frozenset()))
            pairs.append((s, side))
        row = _row(step, name, "backward", "grad_output", rec.backward_index or 0, pairs, backend)
        if row is not None:
            consumers = sorted(set().union(*(s.tag.src for s, _ in pairs)) - {name})
            ends = [callers[c] for c in consumers if c in callers]
            row.note = _where([name], consumers or ["nothing"], [callers.get(name, "")], ends[0] if ends else "",
                              modules, who, backward=True)
            if row.status == Status.KINK:
                row.note += _kink_note(ambiguous)
            rows.append(row)
    return rows


def _row(step: int, name: str, pass_: str, quantity: str, order: int, pairs: list,
         backend: Backend | None) -> Row | None:
    """The worst check of a unit's tensors: ``mismatch`` beyond its bound, ``kink`` within it only with the kink
    allowance of ambiguous decisions upstream (the row shows the error against the rounding bound alone)."""
    worst: tuple[int, float] | None = None
    best: Comparison | None = None
    status = Status.OK
    for s, side in pairs:
        if s is None:
            continue
        dtype = side.dtype if isinstance(side, Tensor) else torch.float64
        u = max(unit_roundoff(dtype), backend.accumulate_roundoff if backend is not None else 0.0)
        eta = 2 * underflow(dtype)
        bound = _bound(s, u, eta) if s.comparison is None else None
        comp = s.comparison if s.comparison is not None else compare(side, s.value, bound)
        verdict = Status.OK if comp.ok else Status.MISMATCH
        if not comp.ok and s.comparison is None and s.allowance is not None:
            widened = s.allowance if bound is None else bound + s.allowance
            if compare(side, s.value, widened).ok:
                verdict = Status.KINK
        key = (STATUS_ORDER[verdict], comp.ratio)
        if worst is None or key > worst:
            worst, best, status = key, comp, verdict
    if best is None:
        return None
    return Row(layer=name, pass_=pass_, quantity=quantity, error_a=best.error, error_b=None,
               tolerance=best.tolerance, status=status, origin=BETWEEN_ORIGIN, step=step, mode=MODE,
               tolerance_a=best.tolerance, ratio_a=best.ratio, worst_a=tuple(best.worst) or None, order=order)


def _where(producers: list[str], consumers: list[str], starts: list[str], end: str, modules: dict[str, nn.Module],
           who: str, backward: bool = False) -> str:
    """``between X and Y: the code in M`` (M: the module whose forward called them), or ``from M1 to M2`` when
    the producers were called in another module's forward than the consumer."""
    def place(name: str) -> str:
        module = modules.get(name)
        kind = f" ({type(module).__name__})" if module is not None else ""
        return f"'{name}'{kind}" if name else f"the model's own forward{kind}"

    begin = sorted(set(starts), key=len, reverse=True)[0] if starts else end
    where = place(end) if begin == end else f"{place(begin)} to {place(end)}"
    where = ("in " if begin == end else "from ") + where
    prefix = f"{who}: " if who else ""
    what = "the backward of the code" if backward else "the code"
    return f"{prefix}between {', '.join(producers)} and {', '.join(consumers)}: {what} {where}"
