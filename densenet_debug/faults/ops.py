"""The planted faults' arithmetic: custom autograd Functions and module forwards that misbehave on purpose.

The precision controls are not here: they are kernels below the capture (:mod:`densenet_debug.faults.kernels`),
and their units only say, in :func:`kernel_forward`, that their ops are theirs.

Each one is a faithful small copy of a historical backend bug (the team's bug catalog, not in the repo); with its fault
switched off, each computes exactly what the stock PyTorch op computes. ``densenet_debug.faults.registry`` decides
where they go. A faulty module keeps its parameters, buffers and qualified name; its class becomes a
subclass of its own (same name, :func:`faulty_class`) whose instances run the faulty forward while
``type(module).forward`` stays the stock one, which a judge calls for the exact expectation. Its
configuration and state live on the module in ``_fault``, so a deep copy carries an independent copy.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_debug.backends import running_unit


@dataclass
class FaultConfig:
    """What a faulty module does wrong, and the state a stateful fault carries between calls."""

    name: str
    mag: float
    state: dict[str, Tensor] = field(default_factory=dict)
    unit: str = ""  # the module's qualified name in the model it was planted in


# -- the faulty class --------------------------------------------------------------------------------------
class _FaultyForward:
    """``instance.forward`` is the fault bound to that instance (any copy of it); ``cls.forward`` the stock one."""

    def __init__(self, fault: Callable[..., Tensor], stock: Callable[..., Tensor]) -> None:
        self.fault, self.stock = fault, stock

    def __get__(self, obj: object, objtype: type | None = None) -> Callable[..., Tensor]:
        return self.stock if obj is None else types.MethodType(self.fault, obj)


_CLASSES: dict[tuple[type, Callable], type] = {}


def faulty_class(base: type[nn.Module], fault: Callable[..., Tensor]) -> type[nn.Module]:
    """A subclass of ``base`` with the same name whose instances run ``fault`` as their forward.

    Binding at attribute access (not an instance attribute) keeps the fault with every copy of the module,
    deep or shallow; ``isinstance`` and ``type(m).__name__`` are unchanged, so error models still apply.
    """
    key = (base, fault)
    if key not in _CLASSES:
        _CLASSES[key] = type(base.__name__, (base,), {
            "forward": _FaultyForward(fault, base.forward), "__module__": __name__,
            "__qualname__": base.__qualname__, "__doc__": f"{base.__name__} with a planted fault ({fault.__name__}).",
        })
    return _CLASSES[key]


# -- numerics helpers ---------------------------------------------------------------------------------
def round_mantissa(t: Tensor, bits: int = 10) -> Tensor:
    """Round to ``bits`` explicit mantissa bits, to nearest, ties to even (TF32 keeps 10 of fp32's 23).

    Formats that already carry no more bits (fp16, bf16) and non-float tensors come back unchanged.
    """
    if t.dtype not in (torch.float32, torch.float64):
        return t
    mantissa, exponent = torch.frexp(t)  # t = mantissa * 2**exponent, |mantissa| in [0.5, 1)
    scale = bits + 1  # the implicit leading bit plus the explicit ones
    return torch.ldexp(torch.round(torch.ldexp(mantissa, torch.tensor(scale))), exponent - scale).to(t.dtype)


def read_as_contiguous(t: Tensor) -> Tensor:
    """The #708 read: walk ``t``'s storage with contiguous strides from ``t``'s own storage offset.

    A contiguous ``t`` reads itself. So does a view whose contiguous walk would run past its storage
    (a stride-0 expanded gradient): the real kernel would have faulted there, not returned numbers.
    """
    if t.is_contiguous():
        return t
    strides = torch.empty(t.shape, device="meta").stride()
    storage_numel = t.untyped_storage().nbytes() // t.element_size()
    if t.storage_offset() + t.numel() > storage_numel:
        return t
    return t.as_strided(t.shape, strides, t.storage_offset())


# -- convolution ---------------------------------------------------------------------------------------
def _conv_args(m: nn.Conv2d) -> tuple:
    return m.stride, m.padding, m.dilation, m.groups


class _ConvFn(torch.autograd.Function):
    """conv2d whose operands and backward pass through a fault's hooks (``cfg.name`` picks them)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, cfg: FaultConfig, args: tuple) -> Tensor:
        stride, padding, dilation, groups = args
        ctx.save_for_backward(x, w)
        ctx.cfg, ctx.args, ctx.has_bias = cfg, args, b is not None
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, go: Tensor) -> tuple:
        x, w = ctx.saved_tensors
        cfg = ctx.cfg
        stride, padding, dilation, groups = ctx.args
        if cfg.name == "strided_read_as_contiguous":
            go = read_as_contiguous(go)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            go, x, w, [w.shape[0]] if ctx.has_bias else None, list(stride), list(padding), list(dilation),
            False, [0, 0], groups, mask,
        )
        if cfg.name == "stale_grad_accumulate":
            gx, gw = _accumulate_stale(cfg, "grad_input", gx), _accumulate_stale(cfg, "grad_weight", gw)
        return gx, gw, gb, None, None


def _accumulate_stale(cfg: FaultConfig, key: str, grad: Tensor | None) -> Tensor | None:
    """ExecuTorch #21686: the output buffer is scatter-added into without being zeroed first."""
    if grad is None:
        return None
    stale = cfg.state.get(key)
    out = grad + cfg.mag * stale if stale is not None and stale.shape == grad.shape else grad
    cfg.state[key] = out.detach().clone()  # the buffer now holds this call's result
    return out


def conv_forward(self: nn.Conv2d, x: Tensor) -> Tensor:
    """Forward of a Conv2d planted with a backward-side fault."""
    return _ConvFn.apply(x, self.weight, self.bias, self._fault, _conv_args(self))


def strided_read_forward(self: nn.Module, x: Tensor) -> Tensor:
    """#708 on a conv, or its BN sibling (PR #2000): the backward reads grad_output as contiguous."""
    if isinstance(self, nn.BatchNorm2d):
        return bn_backward_fault_forward(self, x)
    return conv_forward(self, x)


def kernel_forward(self: nn.Module, *args: object, **kwargs: object) -> Tensor:
    """A unit planted as a kernel (:mod:`densenet_debug.faults.kernels`): the stock forward, run as this unit.

    Nothing changes here; the backend's kernel mode computes this unit's ops as the fault's while it runs.
    """
    with running_unit(self._fault.unit):
        return type(self).forward(self, *args, **kwargs)


# -- concatenation -------------------------------------------------------------------------------------
class _ShiftedCatFn(torch.autograd.Function):
    """cat whose backward hands input i the grad slice ``shift`` channels past its own (wrapping around)."""

    @staticmethod
    def forward(ctx, dim: int, shift: int, *inputs: Tensor) -> Tensor:
        ctx.dim, ctx.shift, ctx.sizes = dim, shift, [t.shape[dim] for t in inputs]
        return torch.cat(inputs, dim)

    @staticmethod
    def backward(ctx, go: Tensor) -> tuple:
        total, grads, offset = go.shape[ctx.dim], [], 0
        for size in ctx.sizes:
            start = (offset + ctx.shift) % total
            if start + size <= total:
                grads.append(go.narrow(ctx.dim, start, size))  # a view, as the real cat backward gives
            else:
                head = go.narrow(ctx.dim, start, total - start)
                grads.append(torch.cat([head, go.narrow(ctx.dim, 0, size - head.shape[ctx.dim])], ctx.dim))
            offset += size
        return (None, None, *grads)


def shifted_cat_forward(self: nn.Module, *inputs: Tensor) -> Tensor:
    return _ShiftedCatFn.apply(self.dim, max(1, int(self._fault.mag)), *inputs)


def permuted_cat_forward(self: nn.Module, *inputs: Tensor) -> Tensor:
    """#99686: the inputs are concatenated in reverse order (the total shape is unchanged)."""
    return torch.cat(inputs[::-1], self.dim)


# -- batch normalisation -------------------------------------------------------------------------------
def _channel_view(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


def _batch_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    return mean, torch.rsqrt(var + eps)


class _BatchNormFn(torch.autograd.Function):
    """batch_norm with a hand-written backward that a fault can bend. The forward is the stock one."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor | None, b: Tensor | None, bn: nn.BatchNorm2d, mode: tuple) -> Tensor:
        use_batch, factor, running_mean, running_var = mode
        out = F.batch_norm(x, running_mean, running_var, w, b, use_batch, factor, bn.eps)
        if use_batch:
            mean, invstd = _batch_stats(x, bn.eps)
        else:
            mean, invstd = running_mean.clone(), torch.rsqrt(running_var + bn.eps)
        ctx.save_for_backward(x, w, mean, invstd)
        ctx.use_batch, ctx.eps, ctx.cfg = use_batch, bn.eps, bn._fault
        return out

    @staticmethod
    def backward(ctx, go: Tensor) -> tuple:
        x, w, mean, invstd = ctx.saved_tensors
        name, use_batch = ctx.cfg.name, ctx.use_batch
        if name == "strided_read_as_contiguous":  # PR #2000: the BN sibling of #708
            go = read_as_contiguous(go)
        if name == "bn_eval_backward_uses_batch_stats" and not use_batch:
            mean, invstd = _batch_stats(x, ctx.eps)  # #586: the train-mode formula in eval
            use_batch = True
        if name == "bn_invstd_as_var":
            invstd = torch.rsqrt(invstd + ctx.eps)  # FlagGems #5222: rsqrt(saved_invstd + eps)
        if name == "bn_layout_mislabel":
            n, c, h, wd = x.shape  # #64039/#175189: NCHW bytes read as if they were NHWC
            x = x.contiguous().view(n, h, wd, c).permute(0, 3, 1, 2)
        scale = _channel_view(invstd) if w is None else _channel_view(w * invstd)
        xhat = (x - _channel_view(mean)) * _channel_view(invstd)
        gb = go.sum(dim=(0, 2, 3))
        gw = (go * xhat).sum(dim=(0, 2, 3))
        if use_batch:
            count = x.numel() // x.shape[1]
            gx = scale * (go - _channel_view(gb) / count - xhat * _channel_view(gw) / count)
        else:
            gx = scale * go
        if name == "partial_channel_tile":  # #57077: the launch covers only the first k channels
            k = tile_channels(x.shape[1], ctx.cfg.mag)
            gx, gw, gb = gx.clone(), gw.clone(), gb.clone()
            gx[:, k:], gw[k:], gb[k:] = 0, 0, 0
        return (gx if ctx.needs_input_grad[0] else None, gw if ctx.needs_input_grad[1] else None,
                gb if ctx.needs_input_grad[2] else None, None, None)


def tile_channels(channels: int, fraction: float) -> int:
    """Channels a partial tile still writes: at least one, never all (so the fault is real)."""
    return min(channels - 1, max(1, int(channels * fraction)))


def _bn_mode(bn: nn.BatchNorm2d) -> tuple[bool, float, Tensor | None, Tensor | None]:
    """(use batch statistics, momentum factor, running mean, running var) as ``_BatchNorm.forward`` has them.

    Like the stock forward, this counts the batch in ``num_batches_tracked`` (train mode).
    """
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return use_batch, factor, bn.running_mean if keep else None, bn.running_var if keep else None


def bn_backward_fault_forward(self: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """Forward of a BatchNorm2d planted with a fault in its backward."""
    return _BatchNormFn.apply(x, self.weight, self.bias, self, _bn_mode(self))


def bn_unbiased_forward(self: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """#4253/#19902 semantics broken: train mode normalises with the variance scaled by 1 + mag/(M-1).

    mag = 1 is exactly the unbiased variance; the running statistics are updated as usual.
    """
    use_batch, factor, running_mean, running_var = _bn_mode(self)
    if not use_batch:
        return F.batch_norm(x, running_mean, running_var, self.weight, self.bias, False, factor, self.eps)
    count = x.numel() // x.shape[1]
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.mul_(1 - factor).add_(factor * mean)
            running_var.mul_(1 - factor).add_(factor * var * count / max(count - 1, 1))
    var = var * (1 + self._fault.mag / max(count - 1, 1))
    out = (x - _channel_view(mean)) * _channel_view(torch.rsqrt(var + self.eps))
    if self.weight is not None:
        out = out * _channel_view(self.weight) + _channel_view(self.bias)
    return out


def bn_double_update_forward(self: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """#96136: the running statistics get a second momentum update per step (checkpoint recompute)."""
    mode = _bn_mode(self)
    use_batch, factor, running_mean, running_var = mode
    out = F.batch_norm(x, running_mean, running_var, self.weight, self.bias, use_batch, factor, self.eps)
    if self.training and running_mean is not None:
        for _ in range(max(1, int(self._fault.mag))):  # the recompute is a whole second forward
            _, factor, _, _ = _bn_mode(self)
            with torch.no_grad():
                F.batch_norm(x.detach(), running_mean, running_var, None, None, True, factor, self.eps)
    return out


# -- pooling -------------------------------------------------------------------------------------------
def pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    """A 2-d op's int-or-tuple hyper-parameter (kernel_size, stride, padding) as (height, width)."""
    return (v, v) if isinstance(v, int) else (v[0], v[-1])


def _padded_pool_grad(pool: nn.AvgPool2d, go: Tensor, shape: torch.Size) -> Tensor:
    """The gradient of avg_pool2d with respect to its explicitly zero-padded input (shape H+2p x W+2p)."""
    (kh, kw), (sh, sw), (ph, pw) = pair(pool.kernel_size), pair(pool.stride or pool.kernel_size), pair(
        pool.padding)
    n, c, h, w = shape
    with torch.enable_grad():
        xp = torch.zeros(n, c, h + 2 * ph, w + 2 * pw, dtype=go.dtype, device=go.device, requires_grad=True)
        if pool.divisor_override:
            divisor: Tensor | float = float(pool.divisor_override)
        elif pool.count_include_pad:
            divisor = float(kh * kw)
        else:  # count only the real pixels of each window
            real = F.pad(torch.ones(1, 1, h, w, dtype=go.dtype, device=go.device), (pw, pw, ph, ph))
            divisor = F.avg_pool2d(real, (kh, kw), (sh, sw), 0, divisor_override=1)
        out = F.avg_pool2d(xp, (kh, kw), (sh, sw), 0, divisor_override=1) / divisor
        (grad,) = torch.autograd.grad(out, xp, go)
    return grad


class _PadOffsetAvgPoolFn(torch.autograd.Function):
    """avg_pool2d whose backward maps input pixel x to the windows of x - pad (#188344's NHWC kernel)."""

    @staticmethod
    def forward(ctx, x: Tensor, pool: nn.AvgPool2d) -> Tensor:
        ctx.pool, ctx.shape = pool, x.shape
        return F.avg_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode,
                            pool.count_include_pad, pool.divisor_override)

    @staticmethod
    def backward(ctx, go: Tensor) -> tuple:
        h, w = ctx.shape[2:]
        grad = _padded_pool_grad(ctx.pool, go, ctx.shape)
        return grad[:, :, :h, :w], None  # the right slice starts at (pad_h, pad_w)


def pool_pad_offset_forward(self: nn.AvgPool2d, x: Tensor) -> Tensor:
    return _PadOffsetAvgPoolFn.apply(x, self)


# -- checkpointed dense layer ----------------------------------------------------------------------------
def detached_checkpoint_forward(self: nn.Module, *features: Tensor) -> Tensor:
    """torchvision #2221: checkpoint got a list, so no input required grad and the front gave no gradient.

    The checkpointed cat+BN+ReLU+1x1 runs once, without autograd: its parameters get no gradient and no
    gradient flows back through it into earlier features. Outside training it is the correct layer.
    """
    if not (self.memory_efficient and self.training and any(f.requires_grad for f in features)):
        return type(self).forward(self, *features)
    with torch.no_grad():
        out = self._front(*(f.detach() for f in features))
    if self.bottleneck:
        out = self._drop(1, out)
        out = self.conv2(self.relu2(self.norm2(out)))
    return self._drop(2, out)


Forward = Callable[..., Tensor]
