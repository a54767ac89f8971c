"""A unit of a model as a pure function of its checked tensors, for :mod:`densenet_debug.gradcheck.engine`.

Inputs *and* parameters are arguments (``torch.func.functional_call``). Points are evaluated in batches
with ``torch.func.vmap`` (train-mode BatchNorm made stateless for it: its running buffers are written,
never read, in train mode), falling back to one point at a time for units vmap cannot batch (a random
op such as dropout, an in-place buffer update). Every evaluation runs under the same RNG seed, so a
dropout mask is the same at every point, and leaves the caller's RNG untouched.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from densenet_debug.gradcheck.batched import (
    affine_in,
    batched_call,
    elementwise,
    known,
    points_inside,
    reduction_length,
)
from densenet_debug.trace import Layout, flatten_tensors, with_layout

CHUNK_BYTES = 1 << 28  # memory for one batch of evaluation points


@dataclass
class Slot:
    """One checked tensor of a unit: an input (``input0``) or a parameter (``weight``, ``conv.weight``)."""

    name: str
    kind: str
    key: int | str
    base: Tensor
    layout: Layout | None = None
    grad: Tensor | None = None


class UnitFunction:
    """A unit as a pure function of its checked tensors, with the step's grad_outputs and gradients."""

    def __init__(
        self, name: str, module: nn.Module, args: list, kwargs: dict, *, buffers: dict[str, Tensor] | None,
        grad_outputs: list[Tensor | None] | None, input_layouts=None, grad_output_layouts=None,
        grads: dict[str, Tensor | None] | None = None, seed: int = 0, outputs: list[Tensor] | None = None,
    ) -> None:
        self.name, self.module, self.args, self.kwargs, self.seed = name, module, list(args), kwargs, seed
        self.params = {k: p.detach() for k, p in module.named_parameters()}
        self.buffers = {k: b.detach().clone() for k, b in module.named_buffers()} if buffers is None else buffers
        self.slots: list[Slot] = []
        layouts = list(input_layouts or [])
        for i, a in enumerate(self.args):
            if isinstance(a, Tensor) and a.is_floating_point():
                g = None if grads is None else grads.get(f"input{i}")
                if grads is None or g is not None:
                    lay = layouts[i] if i < len(layouts) else None
                    self.slots.append(Slot(f"input{i}", "input", i, a.detach().contiguous(), lay, g))
        for k, p in module.named_parameters():
            g = None if grads is None else grads.get(k)
            if (grads is None and p.requires_grad) or g is not None:
                self.slots.append(Slot(k, "param", k, p.detach(), None, g))
        self._fmodule: nn.Module | None = None
        self.vectorized = True
        known = None if self.kwargs else reduction_length(module, self.args)
        usable = outputs is not None and all(isinstance(o, Tensor) for o in outputs)
        if known == 1 and usable:  # exact ops (ReLU, cat, flatten): |f| is all the magnitude there is
            f0, self.f_abs = [o.detach() for o in outputs if o.is_floating_point()], None
        else:
            with torch.no_grad(), self._rng():
                f0 = self.f_abs = self._call_abs()  # also tells the outputs' shapes
        self.out_numel = [o.numel() for o in f0]
        v = list(grad_outputs or [])[: len(f0)]
        v += [None] * (len(f0) - len(v))
        self.recorded = grads is not None and any(g is not None for g in v)
        if all(g is None for g in v):  # the step gave none: draw a Gaussian grad_output and replay
            gen = torch.Generator().manual_seed(seed)
            v = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in f0]
        self.v = [None if g is None else g.detach() for g in v]
        lays = list(grad_output_layouts or [])
        self.v_layouts = [lays[i] if i < len(lays) else None for i in range(len(f0))]
        tensors = [a for a in self.args if isinstance(a, Tensor) and a.is_floating_point()]
        # The largest tensor bounds any reduction length in the unit; the op's own is used where known.
        self.n_reduce = max([t.numel() for t in (*tensors, *self.params.values())] + self.out_numel + [1])
        self.n_forward = self.n_reduce if known is None else known
        self._magnitude: list[Tensor] | None = None
        # f(t) as the step computed it (any correct evaluation of f(t) is within the error model).
        self._base = None if outputs is None or len(outputs) != len(f0) else [o.detach() for o in outputs]
        self._abs_v: list[Tensor | None] | None = None
        self._output_scale: float | None = None
        self._projected: float | None = None
        self._term_norms: list[float] | None = None

    @property
    def fmodule(self) -> nn.Module:
        if self._fmodule is None:
            self._fmodule = _functional_copy(self.module)
        return self._fmodule

    # -- evaluation ------------------------------------------------------------------------------------
    @contextmanager
    def _rng(self) -> Iterator[None]:
        """Every evaluation sees the same random numbers (dropout masks) and leaves the caller's RNG alone."""
        if not self.kwargs and known(self.module):  # its ops draw no random numbers
            yield
            return
        devices = sorted({d.index or 0 for d in self._devices() if d.type == "cuda"})
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(self.seed)
            for i in devices:
                torch.cuda.default_generators[i].manual_seed(self.seed)
            yield

    def _devices(self) -> set[torch.device]:
        return {t.device for t in (*self.params.values(), *self.args) if isinstance(t, Tensor)}

    def call(self, tensors: list[Tensor], functional: bool = True) -> list[Tensor]:
        args, params = list(self.args), dict(self.params)
        for slot, t in zip(self.slots, tensors):
            if slot.kind == "input":
                args[slot.key] = t
            else:
                params[slot.key] = t
        if functional:
            module = self.fmodule
            bufs = {k: self.buffers[k] for k, _ in module.named_buffers() if k in self.buffers}
        else:  # the real module (its kernels), on copies of the buffers BN would update in place
            module, bufs = self.module, {k: b.clone() for k, b in self.buffers.items()}
        out = functional_call(module, {**params, **bufs}, tuple(args), self.kwargs)
        return [o for o in flatten_tensors(out) if o.is_floating_point()]

    def evaluate(self, slots: list[int], stacks: list[Tensor]) -> list[Tensor]:
        """Outputs at P points, (P, *out) each: ``stacks[i]`` holds P values of slot ``slots[i]``."""
        points = stacks[0].shape[0]
        per_point = 8 * (sum(s[0].numel() for s in stacks) + sum(self.out_numel))
        chunk = max(1, min(points, CHUNK_BYTES // max(per_point, 1)))
        parts = [self._evaluate(slots, [s[i:i + chunk] for s in stacks]) for i in range(0, points, chunk)]
        if len(parts) == 1:
            return parts[0]
        return [torch.cat([p[o] for p in parts]) for o in range(len(parts[0]))]

    def _evaluate(self, slots: list[int], stacks: list[Tensor]) -> list[Tensor]:
        base = [s.base for s in self.slots]
        if not self.kwargs:
            args, params = list(self.args), dict(self.params)
            for s, t in zip(slots, stacks):
                slot = self.slots[s]
                if slot.kind == "input":
                    args[slot.key] = t
                else:
                    params[slot.key] = t
            with torch.no_grad():
                out = batched_call(self.module, args, params, self.buffers, {self.slots[s].key for s in slots},
                                   stacks[0].shape[0])
            if out is not None:
                return [o for o in out if o.is_floating_point()]
        if self.vectorized:
            def fn(*batched: Tensor) -> list[Tensor]:
                tensors = list(base)
                for s, t in zip(slots, batched):
                    tensors[s] = t
                return self.call(tensors)

            try:
                with torch.no_grad(), self._rng():
                    return vmap(fn, randomness="error")(*stacks)
            except Exception as exc:  # a random op, no batching rule, a buffer updated in place: go point by point
                self.vectorized = False
                if "random" in str(exc):
                    self.recorded = False  # the step's dropout mask is not ours: replay the backward too
        outs = []
        for p in range(stacks[0].shape[0]):
            tensors = list(base)
            for s, t in zip(slots, stacks):
                tensors[s] = t[p]
            with torch.no_grad(), self._rng():
                outs.append(self.call(tensors, functional=False))
        return [torch.stack([o[i] for o in outs]) for i in range(len(outs[0]))]

    def _call_abs(self) -> list[Tensor]:
        """f(|t|): every float input and parameter replaced by its absolute value."""
        saved = self.args, self.params
        self.args = [a.abs() if isinstance(a, Tensor) and a.is_floating_point() else a for a in self.args]
        self.params = {k: p.abs() for k, p in self.params.items()}
        try:
            return self.call([s.base.abs() for s in self.slots])
        finally:
            self.args, self.params = saved

    def empty_points(self, slot: int, lead: tuple[int, ...]) -> Tensor:
        """Storage for ``lead`` points of a slot, laid out as the batched evaluator reads it fastest."""
        b = self.slots[slot].base
        if not self.kwargs and b.dim() > 1 and points_inside(self.module, self.slots[slot].key):
            inner = torch.empty((b.shape[0], *lead, *b.shape[1:]), dtype=b.dtype, device=b.device)
            return inner.movedim(0, len(lead))  # points inside the batch: BN folds them into channels for free
        return torch.empty((*lead, *b.shape), dtype=b.dtype, device=b.device)

    def affine_in(self, slots: list[int]) -> str | None:
        """What the unit's math says about these slots: affine/piecewise/smooth (the checker verifies it)."""
        return None if self.kwargs else affine_in(self.module, {self.slots[s].key for s in slots})

    def base_outputs(self) -> list[Tensor]:
        """f(t) at the unperturbed point."""
        if self._base is None:
            with torch.no_grad(), self._rng():
                self._base = self.call([s.base for s in self.slots])
        return self._base

    def projected_magnitude(self) -> float:
        """‖v ⊙ m‖₂ over all outputs: the scale of the rounding in <v, f> (m from the step's f(t))."""
        if self._projected is None:
            m = self.magnitude(self.base_outputs())
            self._projected = math.sqrt(sum(float(torch.linalg.vector_norm(g * mo)) ** 2
                                            for g, mo in zip(self.v, m) if g is not None))
        return self._projected

    def output_scale(self) -> float:
        """rms over the unit's outputs at t (1 if they are all zero): the scale of an additive tensor."""
        if self._output_scale is None:
            outs = self.base_outputs()
            n = sum(o.numel() for o in outs)
            r = math.sqrt(sum(float(torch.linalg.vector_norm(o)) ** 2 for o in outs) / n) if n else 0.0
            self._output_scale = r if r > 0 and math.isfinite(r) else 1.0
        return self._output_scale

    def abs_v(self) -> list[Tensor | None]:
        if self._abs_v is None:
            self._abs_v = [None if g is None else g.abs().reshape(-1) for g in self.v]
        return self._abs_v

    def magnitude(self, near: list[Tensor]) -> list[Tensor]:
        """m = max(|f|, |f(|t|)|) per output element, floored at its rms: the size of what each output sums.

        ``near`` is f at (or within a step of) the point. The floor covers outputs near 0 that still come
        from large terms (BN's x - mean).
        """
        if self._magnitude is None:
            mags = [a.abs() if self.f_abs is None else torch.maximum(a.abs(), b.abs())
                    for a, b in zip(near, self.f_abs or near)]
            self._magnitude = [m.clamp_min(float(torch.linalg.vector_norm(m)) / max(1, m.numel()) ** 0.5)
                               for m in mags]
        return self._magnitude

    def term_norms(self) -> list[float]:
        """‖|J_j|ᵀ|v|‖₂ per slot: the size of each gradient's terms, signs dropped (0 where it cannot be had).

        The backward evaluated on magnitudes (|inputs|, |parameters|, |v|) under
        :class:`~densenet_debug.verdict.magnitude.MagnitudeMode`: exact sum |terms| for ops linear in each
        operand, the op at its operands' magnitudes elsewhere. A gradient that cancels (a conv bias before a
        batch norm: ``sum g`` of a ``g`` that sums to 0) is ~0; its terms are not.
        """
        if self._term_norms is None:
            from densenet_debug.verdict.magnitude import MagnitudeMode

            saved = self.args, self.params
            self.args = [a.abs() if isinstance(a, Tensor) and a.is_floating_point() else a for a in self.args]
            self.params = {k: p.abs() for k, p in self.params.items()}
            try:
                leaves = [s.base.abs().requires_grad_() for s in self.slots]
                with self._rng(), torch.enable_grad(), MagnitudeMode():
                    outs = self.call(leaves, functional=False)
                    pairs = [(o, g.abs()) for o, g in zip(outs, self.v) if g is not None and o.requires_grad]
                    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs],
                                                allow_unused=True) if pairs else [None] * len(leaves)
                self._term_norms = [0.0 if g is None else float(torch.linalg.vector_norm(g.detach()))
                                    for g in grads]
            except Exception:  # a unit its magnitudes cannot run through: the gradients' own norms stand
                self._term_norms = [0.0] * len(self.slots)
            finally:
                self.args, self.params = saved
        return self._term_norms

    # -- the backward's answers -------------------------------------------------------------------------
    def analytic(self, v: list[Tensor | None], mask: list[Tensor] | None = None) -> list[Tensor]:
        """The unit's gradient for each slot given grad_outputs ``v``: the step's own when v is the step's.

        ``mask`` (outputs masked out of v) lets an elementwise unit reuse the step's gradient, masked alike:
        with a diagonal Jacobian, Jᵀ(v ⊙ ¬mask) = (Jᵀv) ⊙ ¬mask.
        """
        if self.recorded and all(a is b for a, b in zip(v, self.v)):
            return [s.grad if s.grad is not None else torch.zeros_like(s.base) for s in self.slots]
        if (self.recorded and mask is not None and len(mask) == 1 and not self.kwargs and elementwise(self.module)
                and all(s.grad is not None and s.grad.shape == mask[0].shape for s in self.slots)):
            return [s.grad * ~mask[0] for s in self.slots]
        leaves, outs = self._replay_forward()
        pairs = [(o, with_layout(g, lay)) for o, g, lay in zip(outs, v, self.v_layouts)
                 if g is not None and o.requires_grad]
        if not pairs:
            return [torch.zeros_like(s.base) for s in self.slots]
        grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
        return [torch.zeros_like(s.base) if g is None else g.detach() for s, g in zip(self.slots, grads)]

    def jacobian(self, slot: int) -> Tensor:
        """The Jacobian (n_out, n_in) of the concatenated outputs w.r.t. one slot, one backward per row."""
        leaves, outs = self._replay_forward()
        sizes = [o.numel() for o in outs]
        n_out, n_in = sum(sizes), self.slots[slot].base.numel()
        chunk = max(1, CHUNK_BYTES // (8 * (n_out + n_in)))
        rows = []
        for start in range(0, n_out, chunk):
            r = torch.arange(start, min(n_out, start + chunk))
            eye = torch.zeros(len(r), n_out, dtype=torch.float64, device=outs[0].device)
            eye[torch.arange(len(r)), r] = 1.0
            cots = [c.reshape(len(r), *o.shape) for c, o in zip(eye.split(sizes, dim=1), outs)]
            try:
                g = torch.autograd.grad(outs, leaves[slot], cots, retain_graph=True, is_grads_batched=True,
                                        allow_unused=True)[0]
            except RuntimeError:  # a backward without a batching rule: one row at a time
                g = torch.stack([_zero_if_none(torch.autograd.grad(
                    outs, leaves[slot], [c[i] for c in cots], retain_graph=True, allow_unused=True)[0],
                    leaves[slot]) for i in range(len(r))])
            rows.append(torch.zeros(len(r), n_in, dtype=torch.float64) if g is None else g.reshape(len(r), -1))
        return torch.cat(rows)

    def _replay_forward(self) -> tuple[list[Tensor], list[Tensor]]:
        leaves = [with_layout(s.base, s.layout).detach().requires_grad_() for s in self.slots]
        with self._rng():
            outs = self.call(leaves, functional=False)
        return leaves, outs



def _zero_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g



def _functional_copy(module: nn.Module) -> nn.Module:
    """The unit with train-mode BatchNorms made stateless, so points can be batched with vmap.

    In train mode BN normalizes with batch statistics; its running buffers are only written, never
    read, so dropping them (as ``torch.func.replace_all_batch_norm_modules_`` does) leaves the output
    unchanged. The copy is structural: modules are new objects, tensors are shared.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.training and m.track_running_stats]
    if not bns:
        return module
    return _stateless(module)


def _stateless(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {k: None if m is None else _stateless(m) for k, m in module._modules.items()}
    if isinstance(clone, nn.modules.batchnorm._BatchNorm) and clone.training:
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            clone._buffers[k] = None
        clone.track_running_stats = False
    return clone
