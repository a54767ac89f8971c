"""Many evaluation points of a common leaf module in one call, for the gradient checker.

``torch.func.vmap`` evaluates any unit at P points but is slow where it matters: its BatchNorm rule
costs ~5x a BatchNorm over P·C channels, and a conv with both input and weight batched becomes a
grouped conv. Here the points are folded into the batch (per-sample ops, conv input), into the
channels (BatchNorm input) or into the output channels (conv weight). Each evaluator calls the same
``torch.nn.functional`` op as the module's ``forward``; rounding may differ from one call per point,
which the checker's error model already covers. Only exact types without hooks are handled, and only
the combinations of batched tensors listed; anything else returns None and goes to vmap.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_debug.models.densenet import Concat

Key = int | str  # an input position or a parameter name
Evaluator = Callable[[nn.Module, list, dict[str, Tensor], dict[str, Tensor], set[Key], int], list[Tensor] | None]


def batched_call(module: nn.Module, args: list, params: dict[str, Tensor], buffers: dict[str, Tensor],
                 batched: set[Key], points: int) -> list[Tensor] | None:
    """Outputs (points, ...) of ``module``; tensors named in ``batched`` carry a leading points dim."""
    fn = _EVALUATORS.get(type(module))
    if fn is None or _hooked(module):
        return None
    return fn(module, args, params, buffers, batched, points)


def affine_in(module: nn.Module, batched: set[Key]) -> str | None:
    """``"affine"`` if, by its math, the module's output is affine in the tensors ``batched`` taken
    together; ``"piecewise"`` if piecewise affine (ReLU, max-pool: kinks); ``"smooth"`` if infinitely
    differentiable (BN's input with batch statistics: no kinks to look for); None otherwise or unknown.

    The checker then uses forward differences and verifies the claim (see gradcheck_numerics).
    """
    if type(module) not in _EVALUATORS or _hooked(module):
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        uses_batch = module.training or module.running_mean is None
        if batched <= {"weight", "bias"} or (batched == {0} and not uses_batch):
            return "affine"
        return "smooth"
    if isinstance(module, (nn.ReLU, nn.MaxPool2d)):
        return "piecewise" if batched == {0} else None
    if isinstance(module, Concat):
        return "affine" if all(isinstance(k, int) for k in batched) else None
    return "affine" if len(batched) == 1 else None  # conv, linear: affine in each tensor alone


def known(module: nn.Module) -> bool:
    """A module whose math this file knows (exact type, no hooks): deterministic, no random numbers."""
    return type(module) in _EVALUATORS and not _hooked(module)


def elementwise(module: nn.Module) -> bool:
    """Output i depends on input i alone (a diagonal Jacobian): masking outputs masks the gradient alike."""
    return type(module) in (nn.ReLU, nn.Identity) and not _hooked(module)


def points_inside(module: nn.Module, key: Key) -> bool:
    """Whether points of this tensor are best stored inside the batch dim, (N, P, ...) (BN's input)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and key == 0 and type(module) in _EVALUATORS


def reduction_length(module: nn.Module, args: list) -> int | None:
    """The longest chain of roundings behind one output element, by the op's math (None: unknown).

    A sum of n terms, then a few elementwise operations: conv C_in/groups·k·k (+ bias), linear in_features,
    BN the N·spatial terms of its statistics (+ the normalization's own few operations), pools their
    window, ReLU / max-pool / cat / flatten none (exact).
    """
    if type(module) not in _EVALUATORS or _hooked(module) or not args or not isinstance(args[0], Tensor):
        return None
    x = args[0]
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels // module.groups * kh * kw + 1
    if isinstance(module, nn.Linear):
        return module.in_features + 1
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return x.numel() // x.shape[1] + 8 if x.dim() > 1 else 8
    if isinstance(module, nn.AvgPool2d):
        k = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,) * 2
        return k[0] * k[1] + 1
    if isinstance(module, nn.AdaptiveAvgPool2d):
        out = module.output_size if isinstance(module.output_size, tuple) else (module.output_size,) * 2
        return -(-x.shape[-2] // (out[0] or x.shape[-2])) * -(-x.shape[-1] // (out[1] or x.shape[-1])) + 1
    return 1


def _hooked(module: nn.Module) -> bool:
    from torch.nn.modules import module as mod

    return bool(module._forward_hooks or module._forward_pre_hooks or mod._global_forward_hooks
                or mod._global_forward_pre_hooks)


def _per_sample(op: Callable[[Tensor], Tensor]) -> Evaluator:
    """Ops that treat every sample alike: fold the points into the batch."""
    def ev(m, args, params, buffers, batched, p):
        if batched != {0} or len(args) != 1:
            return None
        x = args[0]
        return [op(x.flatten(0, 1)).unflatten(0, (p, x.shape[1]))]
    return ev


def _conv(m: nn.Conv2d, args, params, buffers, batched, p):
    if len(args) != 1 or m.padding_mode != "zeros":
        return None
    x, w, b = args[0], params["weight"], params.get("bias")
    kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
    if batched == {0}:
        return [F.conv2d(x.flatten(0, 1), w, b, **kw).unflatten(0, (p, x.shape[1]))]
    if batched == {"weight"} and m.groups == 1:  # the P weights side by side as one conv's output channels
        y = F.conv2d(x, w.flatten(0, 1), None if b is None else b.repeat(p), **kw)
        return [y.unflatten(1, (p, w.shape[1])).transpose(0, 1)]
    if batched == {"bias"}:
        return [F.conv2d(x, w, None, **kw)[None] + b.view(p, 1, -1, *[1] * (x.dim() - 2))]
    return None


def _batch_norm(m: nn.modules.batchnorm._BatchNorm, args, params, buffers, batched, p):
    if len(args) != 1 or not batched or not batched <= {0, "weight", "bias"}:
        return None
    x, w, b = args[0], params.get("weight"), params.get("bias")
    use_batch = m.training or buffers.get("running_mean") is None
    rm = None if use_batch else buffers["running_mean"]
    rv = None if use_batch else buffers["running_var"]
    if batched == {0}:  # points become extra channels: each (point, channel) gets its own statistics
        c = x.shape[2]
        xf = x.transpose(0, 1).flatten(1, 2)
        y = F.batch_norm(xf, _rep(rm, p), _rep(rv, p), _rep(w, p), _rep(b, p), use_batch, 0.0, m.eps)
        return [y.unflatten(1, (p, c)).transpose(0, 1)]
    if 0 in batched:
        return None
    # Only the affine parameters move: normalize once, then y = x̂·γ + β per point.
    xhat = F.batch_norm(x, rm, rv, None, None, use_batch, 0.0, m.eps)
    shape = (p, 1, -1, *[1] * (x.dim() - 2))
    y = xhat[None] * (w.view(shape) if "weight" in batched else w.view(shape[1:])) if w is not None else xhat[None]
    if b is not None:
        y = y + (b.view(shape) if "bias" in batched else b.view(shape[1:]))
    return [y]


def _rep(t: Tensor | None, p: int) -> Tensor | None:
    return None if t is None else t.repeat(p)


def _linear(m: nn.Linear, args, params, buffers, batched, p):
    if len(args) != 1:
        return None
    x, w, b = args[0], params["weight"], params.get("bias")
    if batched == {0}:
        return [F.linear(x, w, b)]
    if batched == {"weight"}:
        y = torch.matmul(x, w.transpose(1, 2))
        return [y if b is None else y + b]
    if batched == {"bias"}:
        return [F.linear(x, w)[None] + b.unsqueeze(-2)]
    return None


def _concat(m: Concat, args, params, buffers, batched, p):
    if not batched or not all(isinstance(k, int) for k in batched):
        return None
    parts = [a if i in batched else a.expand(p, *a.shape) for i, a in enumerate(args)]
    return [torch.cat(parts, m.dim + 1 if m.dim >= 0 else m.dim)]


def _flatten(m: nn.Flatten, args, params, buffers, batched, p):
    if batched != {0} or len(args) != 1:
        return None
    end = m.end_dim + 1 if m.end_dim >= 0 else m.end_dim
    return [args[0].flatten(m.start_dim + 1 if m.start_dim >= 0 else m.start_dim, end)]


_EVALUATORS: dict[type, Evaluator] = {
    nn.Conv2d: _conv,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.BatchNorm3d: _batch_norm,
    nn.Linear: _linear,
    Concat: _concat,
    nn.Flatten: _flatten,
    nn.ReLU: lambda m, a, pa, bu, b, p: _per_sample(F.relu)(m, a, pa, bu, b, p),
    nn.Identity: lambda m, a, pa, bu, b, p: _per_sample(lambda x: x)(m, a, pa, bu, b, p),
    nn.AvgPool2d: lambda m, a, pa, bu, b, p: _per_sample(lambda x: F.avg_pool2d(
        x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override))(
        m, a, pa, bu, b, p),
    nn.AdaptiveAvgPool2d: lambda m, a, pa, bu, b, p: _per_sample(
        lambda x: F.adaptive_avg_pool2d(x, m.output_size))(m, a, pa, bu, b, p),
    nn.MaxPool2d: lambda m, a, pa, bu, b, p: None if m.return_indices else _per_sample(lambda x: F.max_pool2d(
        x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode))(m, a, pa, bu, b, p),
}
