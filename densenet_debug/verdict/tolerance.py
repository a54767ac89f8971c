"""Derived tolerances: an elementwise error bound for every quantity a unit produces, from an error model.

Nothing here is tuned. A bound is first order in four unit roundoffs, each multiplying a magnitude that is
computed once, in float64, from the oracle's own record (so both sides of a diff share it)::

    B = u_op * op  +  lam * u_acc * red  +  u_acc * cmp  +  u_out * out  +  eta

* ``op``  - rounding of the operands as they enter the op (the fp64 oracle's inputs cast to the side's
  dtype; TF32/autocast rounding of conv and matmul operands): ``u_op`` per operand and term.
* ``red`` - accumulation error of a reduction of length K. Under the random-rounding model of Higham &
  Mary (SIAM J. Sci. Comput. 2019) the K rounding errors of a sum are independent, mean zero and each
  bounded by u times a partial sum, itself at most ``M = sum |terms|``; Hoeffding's inequality gives
  ``P(|err| > lam * u * sqrt(K) * M) <= 2 exp(-lam^2 / 2)``. ``red`` holds ``sqrt(K) * M``; ``lam`` is
  chosen by :func:`confidence` so that a union bound over every element checked in a run keeps the chance
  of one false alarm below 1e-6.
* ``cmp`` - deterministic elementwise roundings inside the op (a subtraction, a square root ...), each
  bounded by ``u_cmp`` (``u_acc``, or the operands' u when they are bf16/fp16 and intermediates may be
  stored so) times the magnitude of its result.
* ``out`` - rounding of the stored result (``u_out`` of the dtype the side returns it in).
* ``eta`` - half the smallest subnormal of the result dtype: the absolute error of a gradual underflow.

``M`` for conv, linear, pooling, cat and any other op linear in each operand is exact and cheap: the same
op evaluated on ``|inputs|`` and ``|parameters|`` (forward) and back-propagated with ``|grad_output|``
(backward) gives ``sum |terms|`` for the output, the input grads and the parameter grads in one fp64 pass.
BatchNorm, whose statistics and gradients cancel, gets its own first-order model; piecewise-linear ops
(ReLU ...) are exact up to operand rounding, their branch flips being kinks (:mod:`densenet_debug.verdict.kinks`).
Unknown modules fall back to the |.|-evaluation with K = the number of input elements (stated as such).

The teacher is a float64 evaluation too. A side is compared with the oracle's record of the unit, which is
itself the unit evaluated once in float64 on the same inputs, on this machine or on the one that recorded a
fixture (another thread count, CPU kernel set or PyTorch release rounds differently; float64 is never
bit-exact across machines). Both are within their bounds of the exact result, so a local row allows
``B(side precision) + B(fp64_precision)`` over the same magnitudes (``TEACHER_ORIGIN``): for a float32 side the
teacher adds 2^-29 of its bound, for a float64 side it doubles it.

**What errors are relative to.** Each bound is ``c * M + eta``: rounding lives on the scale of the terms
``M = sum |terms|``, not on the result, which may cancel to ~0 (a conv bias before a batch norm: its gradient
``sum g`` is ~1e-17 because BN's ``g`` sums to zero per channel, while ``sum |g|`` is O(1)). So every model
also states ``max M`` per quantity (:attr:`UnitBounds.terms`; for BN, whose bounds are not one ``c * M``, the
sums of |terms| of its own formulas, :func:`_bn_terms`), and a row's error and tolerance are read on it
(:mod:`densenet_debug.verdict.compare`). With ``e = max|side - truth|`` and ``b`` the bound at the worst
element, the row shows ``e / S`` and ``b / S`` with ``S >= max M``: for a correct float32 side both are
O(u sqrt(K)) whatever the truth's size, a wrong value is ``|fault| / S``, and ``error > tolerance`` exactly
when some element exceeds its bound, as before. A first-order sum of such tolerances (a composite's, the
propagated rule's) then adds numbers of one kind, u-sized, instead of letting one cancelled quantity's
``b / max|truth|`` (1e+10) swamp the sum and mask every row it covers.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from densenet_debug.backends import U64
from densenet_debug.models.densenet import Concat
from densenet_debug.trace import UnitRecord
from densenet_debug.verdict.compare import Comparison, abs_difference, compare, oracle_scale  # re-exported
from densenet_debug.verdict.magnitude import MagnitudeMode, magnitude_module

FALSE_ALARM = 1e-6  # chance, per run, that a correct backend fails any single element of any check


def confidence(elements: int, false_alarm: float = FALSE_ALARM) -> float:
    """lam with ``elements * 2 exp(-lam^2/2) <= false_alarm`` (Hoeffding + union bound)."""
    return math.sqrt(2.0 * math.log(2.0 * max(elements, 1) / false_alarm))


def underflow(dtype: torch.dtype) -> float:
    """Half the smallest positive subnormal of ``dtype``: the absolute error of rounding near zero."""
    if not dtype.is_floating_point:
        return 0.0
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps / 2  # smallest subnormal = tiny * eps


@dataclass(frozen=True)
class Precision:
    """The unit roundoffs one side computes a quantity with, and the confidence factor of the run."""

    u_op: float
    u_acc: float
    u_out: float
    lam: float
    eta: float = 0.0
    u_cmp: float = 0.0  # elementwise intermediates; 0 means u_acc

    @property
    def cmp(self) -> float:
        return self.u_cmp or self.u_acc

    def plus(self, other: Precision) -> Precision:
        """Roundoffs added component-wise (same ``lam``). Every bound here is linear in (u_op, u_acc, u_cmp,
        u_out, eta), each term carrying exactly one of them, so ``B(p.plus(q)) == B(p) + B(q)``: one
        evaluation, memoised once for every side that shares ``p``."""
        return Precision(u_op=self.u_op + other.u_op, u_acc=self.u_acc + other.u_acc, u_out=self.u_out + other.u_out,
                         lam=self.lam, eta=self.eta + other.eta, u_cmp=self.cmp + other.cmp)


BoundFn = Callable[[Precision], Tensor]


def fp64_precision(lam: float) -> Precision:
    """A float64 evaluation on the CPU: every unit roundoff 2^-53 (the teacher's own, see
    :func:`densenet_debug.verdict.local.with_teacher`)."""
    return Precision(u_op=U64, u_acc=U64, u_out=U64, lam=lam, eta=2 * underflow(torch.float64), u_cmp=U64)


TEACHER_ORIGIN = ("plus the teacher's own bound: the oracle is itself a float64 evaluation of this unit on "
                  "these inputs (u=2^-53 over the same magnitudes), which may round differently from this one's")


def linear_bound(magnitude: Tensor, operands: int, k: int) -> BoundFn:
    """``(operands*u_op + lam*u_acc*sqrt(K) + u_out) * M + eta``: the bound of a sum of K products."""
    exact = k <= 1 and operands <= 1

    def bound(p: Precision) -> Tensor:
        if exact:  # data movement: only the cast of the operand rounds
            return magnitude * p.u_op + p.eta
        return magnitude * (operands * p.u_op + p.lam * p.u_acc * math.sqrt(k) + p.u_out) + p.eta

    return bound


@dataclass
class UnitBounds:
    """Error models of one unit: quantity key -> bound function of the side's :class:`Precision`.

    Bounds are memoised per precision, so two sides computing in the same precision share one evaluation.
    """

    fns: dict[str, BoundFn] = field(default_factory=dict)
    origin: str = ""
    matmul: bool = False  # conv/linear class: operands take TF32/autocast rounding
    kinky: bool = False  # piecewise op: branch flips are kinks, not errors
    exact: bool = False  # data movement or a ReLU-like op: must equal itself evaluated on the side's inputs
    roundings: int = 0  # an exact op's roundings per element in the side's dtype (leaky ReLU's slope product: 2)
    terms: dict[str, float] = field(default_factory=dict)  # key -> max sum |terms|: the scale errors live on
    # fills ``terms`` when one of ``lazy_terms`` is first asked for (BN's come from the passes its bounds make:
    # :func:`_batchnorm`)
    fill_terms: Callable[[], None] | None = field(default=None, repr=False)
    lazy_terms: frozenset[str] = frozenset()
    _memo: dict = field(default_factory=dict, repr=False)

    def __contains__(self, key: str) -> bool:
        return key in self.fns

    def bound(self, key: str, p: Precision) -> Tensor | None:
        if key not in self.fns:
            return None
        memo_key = (key, p)
        if memo_key not in self._memo:
            self._memo[memo_key] = self.fns[key](p)
        return self._memo[memo_key]

    def scale(self, key: str) -> float | None:
        """max sum |terms| of quantity ``key`` (None without an error model): what its errors are read on."""
        if self.fill_terms is not None and key in self.lazy_terms:
            fill, self.fill_terms = self.fill_terms, None
            fill()
        return self.terms.get(key)


# -- classification -----------------------------------------------------------------------------------
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
PIECEWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Threshold)
SLOPED = (nn.LeakyReLU,)  # piecewise with a product on one branch: it rounds
FUSED_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
EXACT = (Concat, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout2d)
AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
           nn.AdaptiveAvgPool3d)


def unit_bounds(module: nn.Module, rec: UnitRecord, params: dict[str, Tensor]) -> UnitBounds:
    """Magnitudes for every quantity of ``rec`` (an oracle :class:`~densenet_debug.trace.UnitRecord`).

    ``module`` is the unit (any dtype/device: only its type and hyper-parameters are read); ``params`` its
    parameters in fp64 at the oracle's step. Quantity keys: ``output.i``, ``grad_input.i``,
    ``grad_<param>``, ``buffer.<name>``.
    """
    if isinstance(module, NORM):
        return _batchnorm(module, rec, params)
    if isinstance(module, SLOPED):
        # x * slope (forward) and g * slope (backward) on the negative side: the kernel casts the slope to the
        # side's dtype (one rounding) and rounds the product (one more); fp64 rounds the product once
        return UnitBounds(origin=f"{type(module).__name__}: selection with a product by the slope; equals itself "
                                 "evaluated in fp64 on the side's own (rounded) inputs and grad_output to 2 roundings "
                                 "of the side's dtype (slope cast, product) and one of fp64, per element",
                          exact=True, roundings=2)
    if isinstance(module, EXACT + PIECEWISE):
        return UnitBounds(origin=f"{type(module).__name__}: exact op; must equal itself evaluated in fp64 on the "
                                 "side's own (rounded) inputs and grad_output", exact=True)
    if isinstance(module, MAXPOOL):
        return _piecewise(module, rec)
    return _multilinear(module, rec, params)


# -- multilinear ops: the |.|-evaluation ---------------------------------------------------------------
def _reduction_lengths(module: nn.Module, rec: UnitRecord) -> tuple[dict[str, int], str]:
    """K per quantity key, and the sentence that says why."""
    x = rec.inputs[0] if rec.inputs else None
    if isinstance(module, CONV + CONV_T):
        kernel = math.prod(module.kernel_size)
        cin, cout = module.in_channels // module.groups, module.out_channels // module.groups
        out = rec.outputs[0]
        per_weight = out.shape[0] * math.prod(out.shape[2:]) if not isinstance(module, CONV_T) else (
            x.shape[0] * math.prod(x.shape[2:]))
        fwd, bwd = (cin * kernel, cout * kernel) if not isinstance(module, CONV_T) else (cout * kernel, cin * kernel)
        ks = {"output": fwd, "grad_input": bwd, "grad_weight": per_weight, "grad_bias": per_weight}
        return ks, (f"conv: K = {fwd} (Cin/g*k*k) forward, {bwd} (Cout/g*k*k) grad_input, {per_weight} "
                    "(N*H*W) grad_weight")
    if isinstance(module, nn.Linear):
        rows = x.numel() // module.in_features
        ks = {"output": module.in_features, "grad_input": module.out_features, "grad_weight": rows,
              "grad_bias": rows}
        return ks, f"linear: K = {module.in_features} forward, {module.out_features} grad_input, {rows} grad_weight"
    if isinstance(module, AVGPOOL):
        window = _pool_window(module, x)
        ks = {"output": window, "grad_input": window}
        return ks, f"average pool: K = {window} (window)"
    if isinstance(module, EXACT):
        return {"output": 1, "grad_input": 1}, f"{type(module).__name__}: exact data movement (K = 1)"
    total = sum(t.numel() for t in rec.inputs if t is not None) + sum(p.numel() for p in module.parameters())
    return {"*": max(total, 1)}, (f"generic ({type(module).__name__}): every aten op evaluated on the magnitudes "
                                  f"of its operands (exact sum |terms| for ops linear in each operand, a "
                                  f"heuristic otherwise), K = {total} (all input elements)")


def _pool_window(module: nn.Module, x: Tensor | None) -> int:
    if x is None:
        return 1
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        k = module.kernel_size
        return math.prod(k) if isinstance(k, tuple) else k ** (x.dim() - 2)
    out = module.output_size if isinstance(module.output_size, tuple) else (module.output_size,) * (x.dim() - 2)
    return math.prod(math.ceil(s / (o or s)) + 1 if s % (o or s) else s // (o or s)
                     for s, o in zip(x.shape[2:], out))


def _multilinear(module: nn.Module, rec: UnitRecord, params: dict[str, Tensor]) -> UnitBounds:
    ks, why = _reduction_lengths(module, rec)
    operands = 1 if isinstance(module, EXACT + AVGPOOL) else 2
    clone = magnitude_module(module, params)
    clone.train(rec.training)
    if isinstance(module, nn.Dropout | nn.Dropout2d):
        clone.eval()
    xs = [None if t is None else t.detach().abs().requires_grad_(i < len(rec.grad_inputs)
                                                                and rec.grad_inputs[i] is not None)
          for i, t in enumerate(rec.inputs)]
    named = dict(clone.named_parameters(recurse=False))
    # Known ops (conv, linear, pooling) never subtract, so |operands| alone give sum |terms|; the aten-level
    # mode is for unknown units (and its first use costs an import of torch._dynamo). A group, layer or
    # instance norm *unit* runs its fused kernel as its decomposition: on |values| the kernel normalises them
    # again, so its "magnitudes" came out below the terms (a correct float32 group norm failed its output at
    # 7.6x the bound, an instance norm's grad_input, whose truth cancels to ~0, at 1e15x). A composite keeps
    # the kernels whole: its children are judged by their own models, and a decomposed batch norm inside one
    # widened the composite's bound 1,600-fold, and with it every propagated sum downstream.
    if isinstance(module, CONV + CONV_T + AVGPOOL + (nn.Linear,)):
        mode = contextlib.nullcontext
    elif isinstance(module, FUSED_NORMS):
        mode = functools.partial(MagnitudeMode, decompose_fused=True)
    else:
        mode = MagnitudeMode
    with torch.enable_grad(), mode():
        out = clone(*xs)
    outs = [out] if isinstance(out, Tensor) else [o for o in out if isinstance(o, Tensor)]
    result = UnitBounds(origin=why, matmul=isinstance(module, CONV + CONV_T + (nn.Linear,)))

    def fn(key: str, mag: Tensor) -> BoundFn:
        return linear_bound(mag, operands, ks.get(key.split(".")[0], ks.get("*", 1)))

    for i, o in enumerate(outs):
        result.fns[f"output.{i}"] = fn("output", o.detach())
        result.terms[f"output.{i}"] = _max(o)
    grads_out = [None if g is None else g.abs() for g in rec.grad_outputs]
    wanted = [(f"grad_input.{i}", t) for i, t in enumerate(xs) if t is not None and t.requires_grad]
    wanted += [(f"grad_{n}", p) for n, p in named.items() if n in rec.param_grads]
    live = [(o, g) for o, g in zip(outs, grads_out) if g is not None and o.requires_grad]
    if wanted and live:
        with mode():
            grads = torch.autograd.grad([o for o, _ in live], [t for _, t in wanted], [g for _, g in live],
                                        allow_unused=True)
        for (key, t), g in zip(wanted, grads):
            result.fns[key] = fn(key, torch.zeros_like(t) if g is None else g)
            result.terms[key] = 0.0 if g is None else _max(g)
    return result


def _max(t: Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


# -- piecewise-linear ops (ReLU family, max pooling): exact on either side of a kink ----------------------
def _piecewise(module: nn.Module, rec: UnitRecord) -> UnitBounds:
    """Output: the cast of the input (u_op); grad_input: the cast grad_output routed by the oracle's branch.

    The |grad_output| routed through the oracle's own backward is ``|J|^T |g|`` (the Jacobian of these ops
    is non-negative), which also covers max pools whose windows overlap (sums of up to K routed terms).
    """
    result = UnitBounds(origin=f"{type(module).__name__}: exact per branch (operand rounding only); "
                               "branch flips are kinks", kinky=True)
    for i, o in enumerate(rec.outputs):
        result.fns[f"output.{i}"] = linear_bound(o.abs(), 1, 1)
        result.terms[f"output.{i}"] = _max(o)
    x = rec.inputs[0] if rec.inputs else None
    g = rec.grad_outputs[0] if rec.grad_outputs else None
    if x is None or g is None or not rec.grad_inputs or rec.grad_inputs[0] is None:
        return result
    xr = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = type(module).forward(module, xr)
    (routed,) = torch.autograd.grad(y, xr, g.abs())
    k = _overlap(module)
    result.fns["grad_input.0"] = linear_bound(routed, 1, k) if k > 1 else linear_bound(routed, 1, 1)
    result.terms["grad_input.0"] = _max(routed)
    return result


def _overlap(module: nn.Module) -> int:
    """Windows of a max pool that can cover one input element (1 for elementwise ops)."""
    if not isinstance(module, MAXPOOL) or isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)):
        return 1
    ks = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,)
    st = module.stride if isinstance(module.stride, tuple) else (module.stride,)
    return math.prod(math.ceil(k / s) for k, s in zip(ks, st))


def repeated_addend_count(g: Tensor) -> Tensor:
    """``K_eff = sum_v m_v^2`` per channel: the accumulation length of a sum of ``g`` over all dims but 1.

    The random-rounding model (``lam u sqrt(K) M``) takes the K rounding errors of a sum as independent. They
    are not when addends repeat: adding the same ``v`` to partial sums on one ulp grid (one binade) leaves the
    same residue ``v mod ulp`` every time, so those roundings are *equal*, not independent. BN's grad_output
    repeats by construction wherever a pooling follows: the last BN of a DenseNet gets ``g = mask * G / (H W)``,
    one value per (sample, channel) repeated over H*W positions (ReLU zeros add exactly). CPU's channels_last
    ``native_batch_norm_backward`` sums it row after row in one float32 accumulator per channel, so a run of
    H*W equal addends rounds H*W times the same way (measured: error up to 16 u sqrt(R) sum|g|, beyond
    ``lam`` ~ 7; the contiguous kernel splits the run over vector lanes and stays under 0.5 u sqrt(R) sum|g|).

    Model: group the nonzero addends of a channel by value (``m_v`` of value ``v``); each group's rounding
    errors are worst-case fully correlated, ``|e_v| <= u m_v M``; distinct groups are independent and mean
    zero. Hoeffding over the groups: ``P(|err| > lam u M sqrt(sum_v m_v^2)) <= 2 exp(-lam^2/2)``, which is the
    usual bound (K = R) when no value repeats; :func:`sum_accumulation_factor` caps it at the deterministic
    first-order ``(R - 1) u M``. Values are grouped as float32 (BN runs in float32 or float64, autocast
    included; float32 ties only merge float64 groups, and merging never lowers ``sum m_v^2``), so the count
    does not depend on the side's precision and bounds stay linear in it (:meth:`Precision.plus`).
    """
    c = g.shape[1]
    g = g.detach().cpu()
    if g.dtype not in (torch.float64, torch.float32, torch.float16):  # NumPy has no bfloat16: exact to float32
        g = g.to(torch.float32)
    if g.numel() == 0:
        return torch.zeros(c, dtype=torch.float64)
    # channels first, as float32, in one copy (NumPy's strided cast: a third of torch's movedim + reshape + to)
    rows = np.ascontiguousarray(g.numpy().transpose(1, 0, *range(2, g.dim())), dtype=np.float32).reshape(c, -1)
    # Grouped by bit pattern: equal patterns are equal float32 values, and the order within a row does not
    # matter, only that equal values end up adjacent. The two zeros (+0, -0: patterns 0 and 0x80000000) differ
    # as patterns and are both left out. NumPy throughout (its SIMD sort: 6 ms against torch's 75-110 ms for a
    # 216 x 8192 block-1 grad_output, one thread; the run bookkeeping then costs a few passes, not a dozen).
    s = np.sort(rows.view(np.int32), axis=1)
    nonzero = (s & 0x7FFFFFFF) != 0
    k = np.count_nonzero(nonzero, axis=1).astype(np.float64)  # every nonzero addend once: sum_v m_v if none repeat
    repeats = np.flatnonzero(((s[:, 1:] == s[:, :-1]) & nonzero[:, 1:]).any(axis=1))
    if repeats.size:  # rows where a nonzero value repeats: add m_v^2 - m_v for each run of equal values
        sub = s[repeats]
        n = sub.shape[1]
        bounds = np.ones((len(repeats), n + 1), dtype=bool)  # a run starts at column 0 and ends at column n
        np.not_equal(sub[:, 1:], sub[:, :-1], out=bounds[:, 1:n])
        edges = np.flatnonzero(bounds)  # run boundaries, row-major over (rows, n + 1)
        starts, lengths = edges[:-1], np.diff(edges)
        runs = (starts % (n + 1)) != n  # a row's end sentinel starts no run (its pair spans two rows)
        starts, lengths = starts[runs], lengths[runs].astype(np.float64)
        row, col = np.divmod(starts, n + 1)
        counted = (sub[row, col] & 0x7FFFFFFF) != 0  # zeros add exactly
        k[repeats] += np.bincount(row[counted], weights=lengths[counted] ** 2 - lengths[counted],
                                  minlength=len(repeats))
    return torch.from_numpy(k)


def sum_accumulation_factor(lam: float, k_eff: Tensor, length: int) -> Tensor:
    """``min(lam sqrt(K_eff), R - 1)``: accumulation error of a sum of ``length`` addends per ``u sum|terms|``
    (:func:`repeated_addend_count`: probabilistic over groups of equal addends, capped by the worst case)."""
    return torch.clamp(lam * k_eff.sqrt(), max=float(max(length - 1, 1)))


# -- batch normalisation ---------------------------------------------------------------------------------
def _batchnorm(module: nn.Module, rec: UnitRecord, params: dict[str, Tensor]) -> UnitBounds:
    """First-order rounding model of BN forward, backward and running-stat update (derivation inline).

    Per channel, with R = N*H*W: mean and variance are sums over R (the variance bounded with E[x^2], so
    the one-pass E[x^2] - mu^2 formula and its cancellation are covered); sigma's relative error is half the
    variance's; xhat = (x - mu)/sigma inherits both. Backward: grad_bias = sum g, grad_weight = sum g*xhat,
    grad_input = gamma/sigma * (g - sum g / R - xhat * sum g*xhat / R), each term bounded with |.|.
    """
    x = rec.inputs[0]
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    R = x.numel() // x.shape[1]
    batch_stats = rec.training or not module.track_running_stats
    result = UnitBounds(origin=f"batch norm ({'batch' if batch_stats else 'running'} statistics): first-order "
                               f"model, sums over R = {R} (N*H*W) bounded with |terms| (cancellation included)")
    memo: dict[Precision, dict[str, Tensor]] = {}
    channel: dict[str, Tensor] = {}  # per-channel sums both the terms and the bounds read, computed once

    def all_bounds(p: Precision) -> dict[str, Tensor]:
        if p not in memo:
            memo.clear()
            # the first evaluation also states the terms, from the full-size tensors it makes anyway
            terms = None if result.fill_terms is None else result.terms
            memo[p] = _bn_bounds(module, rec, params, p, dims, shape, R, batch_stats, channel, terms)
            if terms is not None:
                result.fill_terms = None
        return memo[p]

    keys = ["output.0"]
    if rec.grad_outputs and rec.grad_outputs[0] is not None:
        keys += [f"grad_{n}" for n in ("weight", "bias") if n in rec.param_grads]
        if rec.grad_inputs and rec.grad_inputs[0] is not None:
            keys.append("grad_input.0")
    if batch_stats and module.track_running_stats and rec.buffers_after:
        keys += ["buffer.running_mean", "buffer.running_var"]
        if "num_batches_tracked" in rec.buffers_after:
            result.fns["buffer.num_batches_tracked"] = lambda p: torch.zeros(())
    for key in keys:
        result.fns[key] = lambda p, key=key: all_bounds(p)[key]
    # asked for before any bound: on their own (the same numbers, :func:`_bn_terms`)
    result.fill_terms = lambda: result.terms.update(_bn_terms(module, rec, params, dims, shape, R, batch_stats,
                                                              channel))
    result.lazy_terms = frozenset(k for k in keys if k != "buffer.num_batches_tracked")
    return result


def _bn_channel(channel: dict[str, Tensor], key: str, make: Callable[[], Tensor]) -> Tensor:
    """A per-channel statistic of BN's error model (``mu``, ``var``, ``sum|g|``, ``sum|g xhat|``), computed by
    the first of :func:`_bn_terms` and :func:`_bn_bounds` that needs it: each is a pass over a full-size tensor
    (the variance two), and both read the same ones."""
    if key not in channel:
        channel[key] = make()
    return channel[key]


def _bn_terms(module: nn.Module, rec: UnitRecord, params: dict[str, Tensor], dims: list[int], shape: list[int],
              R: int, batch_stats: bool, channel: dict[str, Tensor]) -> dict[str, float]:
    """max sum |terms| of each BN quantity, the sums its bounds scale (:func:`_bn_bounds`), signs dropped:

    y = gamma xhat + beta: ``|gamma||xhat| + |beta|``; grad_bias = sum g: ``sum |g|``; grad_weight = sum g xhat:
    ``sum |g xhat|``; grad_input = gamma/sigma (g - s_g/R - xhat s_gx/R): ``|gamma|/sigma (|g| + sum|g|/R +
    |xhat| sum|g xhat|/R)`` (``|gamma|/sigma |g|`` with running statistics); running_mean = (1-m) rm + m mu:
    ``(1-m)|rm| + m mean|x|``; running_var = (1-m) rv + m R/(R-1) var: ``(1-m)|rv| + m R/(R-1) E[x^2]``.
    """
    x = rec.inputs[0]
    channels = x.shape[1]
    gamma = params.get("weight", torch.ones(channels, dtype=torch.float64)).view(shape).abs()
    beta = params.get("bias", torch.zeros(channels, dtype=torch.float64)).view(shape).abs()
    if batch_stats:
        mu = _bn_channel(channel, "mu", lambda: x.mean(dims, keepdim=True))
        var = _bn_channel(channel, "var", lambda: x.var(dims, unbiased=False, keepdim=True))
    else:
        mu = rec.buffers_before["running_mean"].view(shape)
        var = rec.buffers_before["running_var"].view(shape)
    inv_sigma = torch.rsqrt(var + module.eps)
    axhat = (x - mu).abs_().mul_(inv_sigma)
    out = {"output.0": float((gamma * axhat.amax(dims, keepdim=True) + beta).max())}
    g = rec.grad_outputs[0] if rec.grad_outputs else None
    if g is not None:
        ag = g.abs()
        sum_ag = _bn_channel(channel, "sum_ag", lambda: ag.sum(dims, keepdim=True))
        a1 = _bn_channel(channel, "a1", lambda: (ag * axhat).sum(dims, keepdim=True))
        out["grad_bias"] = float(sum_ag.max())
        out["grad_weight"] = float(a1.max())
        if batch_stats:
            t = ag.add_(sum_ag / R).addcmul_(axhat, a1 / R)
        else:
            t = ag
        out["grad_input.0"] = float((t * (gamma * inv_sigma)).max()) if t.numel() else 0.0
    if batch_stats and module.track_running_stats and rec.buffers_after:
        nbt = rec.buffers_before.get("num_batches_tracked")
        m = module.momentum if module.momentum is not None else 1.0 / (float(nbt) + 1 if nbt is not None else 1.0)
        rm0, rv0 = rec.buffers_before["running_mean"], rec.buffers_before["running_var"]
        m1 = x.abs().mean(dims).reshape(-1)
        q = (var + mu * mu).reshape(-1)
        out["buffer.running_mean"] = float(((1 - m) * rm0.abs() + m * m1).max())
        out["buffer.running_var"] = float(((1 - m) * rv0.abs() + m * R / max(R - 1, 1) * q).max())
    return out


def _bn_bounds(module: nn.Module, rec: UnitRecord, params: dict[str, Tensor], p: Precision, dims: list[int],
               shape: list[int], R: int, batch_stats: bool, channel: dict[str, Tensor],
               terms: dict[str, float] | None = None) -> dict[str, Tensor]:
    """The terms of the model above, with per-channel factors folded so each full-size tensor is touched once.

    Forward:  e_mu = (u_op + r) mean|x| + c|mu|;  e_var = (2u_op + r + 3c) E[x^2] + 2|mu| e_mu;
              rel = e_var / (2 (var + eps)) + 2c;  e_xhat = u_op|x|/sigma + e_mu/sigma + |xhat| (rel + 2c);
              e_y = |gamma| e_xhat + (u_op + 2c)|gamma xhat| + (u_op + c)|beta| + u_out|y|.
    Backward: e_sg = (u_op + r_g) sum|g|;  e_sgx = (u_op + r + c) sum|g xhat| + sum |g| e_xhat;
              e_t = (u_op + 2c)|g| + e_sg/R + |xhat| e_sgx/R + e_xhat |s_gx|/R + 2c(|s_g| + |xhat s_gx|)/R;
              e_gx = |gamma|/sigma (e_t + (rel + 2c)|t|) + u_out|gx|,  t = g - s_g/R - xhat s_gx/R.
    (r = lam u_acc sqrt(R), c = u_cmp; running statistics in eval mode carry u_op instead. r_g = u_acc
    min(lam sqrt(K_eff), R - 1) for the sum of g, whose addends repeat: :func:`repeated_addend_count`.)
    """
    uo, c, uout = p.u_op, p.cmp, p.u_out
    r = p.lam * p.u_acc * math.sqrt(R)  # probabilistic bound of a sum of R terms, per unit of sum |terms|
    x = rec.inputs[0]
    channels = x.shape[1]
    gamma = params.get("weight", torch.ones(channels, dtype=torch.float64)).view(shape).abs()
    beta = params.get("bias", torch.zeros(channels, dtype=torch.float64)).view(shape).abs()
    ax = x.abs()
    if batch_stats:
        mu = _bn_channel(channel, "mu", lambda: x.mean(dims, keepdim=True))
        var = _bn_channel(channel, "var", lambda: x.var(dims, unbiased=False, keepdim=True))
        m1 = ax.mean(dims, keepdim=True)
        q = var + mu * mu  # E[x^2]
        e_mu = (uo + r) * m1 + c * mu.abs()
        e_var = (2 * uo + r + 3 * c) * q + 2 * mu.abs() * e_mu
    else:
        mu = rec.buffers_before["running_mean"].view(shape)
        var = rec.buffers_before["running_var"].view(shape)
        e_mu, e_var = uo * mu.abs(), uo * var.abs()
    inv_sigma = torch.rsqrt(var + module.eps)
    rel = e_var / (2 * (var + module.eps)) + 2 * c
    xhat = (x - mu).mul_(inv_sigma)
    axhat = xhat.abs()
    bound = ax * (gamma * uo * inv_sigma)
    bound.addcmul_(axhat, gamma * (rel + 4 * c + uo)).add_(gamma * e_mu * inv_sigma + (uo + c) * beta + p.eta)
    out = {"output.0": bound.add_(rec.outputs[0].abs().mul_(uout))}
    if terms is not None:  # _bn_terms' numbers, from the tensors at hand
        terms["output.0"] = float((gamma * axhat.amax(dims, keepdim=True) + beta).max())
    g = rec.grad_outputs[0] if rec.grad_outputs else None
    if g is not None:
        ag = g.abs()
        sum_ag = _bn_channel(channel, "sum_ag", lambda: ag.sum(dims, keepdim=True))
        s_g = g.sum(dims, keepdim=True)
        s_gx = (g * xhat).sum(dims, keepdim=True)
        a1 = _bn_channel(channel, "a1", lambda: (ag * axhat).sum(dims, keepdim=True))
        if terms is not None:
            terms["grad_bias"], terms["grad_weight"] = float(sum_ag.max()), float(a1.max())
            t = (ag + sum_ag / R).addcmul_(axhat, a1 / R) if batch_stats else ag
            terms["grad_input.0"] = float((t * (gamma * inv_sigma)).max()) if t.numel() else 0.0
        # s_g sums g, whose values repeat (a pooling's gradient): K_eff for sqrt(R) (repeated_addend_count)
        r_g = p.u_acc * sum_accumulation_factor(p.lam, repeated_addend_count(g), R).view(shape)
        g_ex = uo * inv_sigma * (ag * ax).sum(dims, keepdim=True) + e_mu * inv_sigma * sum_ag + (rel + 2 * c) * a1
        e_sg = (uo + r_g) * sum_ag
        e_sgx = (uo + r + c) * a1 + g_ex
        out["grad_bias"] = (e_sg + uout * s_g.abs()).reshape(-1) + p.eta
        out["grad_weight"] = (e_sgx + uout * s_gx.abs()).reshape(-1) + p.eta
        if rec.grad_inputs and rec.grad_inputs[0] is not None:
            a = gamma * inv_sigma
            if batch_stats:
                k = s_gx.abs() / R
                gx_b = ag * (a * (uo + 2 * c))
                gx_b.addcmul_(axhat, a * (e_sgx / R + (4 * c + rel) * k))
                gx_b.addcmul_(ax, a * uo * inv_sigma * k)
                gx_b.add_(a * (e_sg / R + 2 * c * s_g.abs() / R + e_mu * inv_sigma * k) + p.eta)
                t = (g - s_g / R).sub_(xhat.mul_(s_gx / R)).abs_()  # xhat is not needed after this
                gx_b.addcmul_(t, a * rel + 2 * c * a)
            else:
                gx_b = ag * (a * (uo + 3 * c + rel)) + p.eta
            out["grad_input.0"] = gx_b.add_(rec.grad_inputs[0].abs().mul_(uout))
    if batch_stats and module.track_running_stats and rec.buffers_after:
        nbt = rec.buffers_before.get("num_batches_tracked")
        m = module.momentum if module.momentum is not None else 1.0 / (float(nbt) + 1 if nbt is not None else 1.0)
        rm0, rv0 = rec.buffers_before["running_mean"], rec.buffers_before["running_var"]
        rm1, rv1 = rec.buffers_after["running_mean"], rec.buffers_after["running_var"]
        if terms is not None:
            terms["buffer.running_mean"] = float(((1 - m) * rm0.abs() + m * m1.reshape(-1)).max())
            terms["buffer.running_var"] = float(((1 - m) * rv0.abs() + m * R / max(R - 1, 1) * q.reshape(-1)).max())
        out["buffer.running_mean"] = ((1 - m) * uo * rm0.abs() + m * e_mu.reshape(-1) + (2 * c + uout) * rm1.abs()
                                      + p.eta)
        out["buffer.running_var"] = ((1 - m) * uo * rv0.abs() + m * R / max(R - 1, 1) * e_var.reshape(-1)
                                     + (3 * c + uout) * rv1.abs() + p.eta)
    return out


__all__ = ["FALSE_ALARM", "TEACHER_ORIGIN", "U64", "Comparison", "Precision", "UnitBounds", "abs_difference",
           "compare", "confidence", "fp64_precision", "linear_bound", "oracle_scale", "repeated_addend_count",
           "sum_accumulation_factor", "underflow", "unit_bounds"]
