"""Run any DenseNet / DenseNet-BC of ``densenet_debug.models`` in NumPy float64 from its state dict.

The unit graph is rebuilt from the config alone (depth, growth rate, bottleneck, compression ...) with
the same qualified names as the PyTorch modules, so every unit's outputs and gradients can be compared
one to one. No torch here: the state dict arrives as NumPy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from densenet_debug.errors import UsageError
from densenet_debug.numpy_oracle import ops

Array = np.ndarray
BN_EPS, BN_MOMENTUM = 1e-5, 0.1  # torch.nn.BatchNorm2d's defaults, which DenseNet uses


@dataclass
class UnitSpec:
    """One unit: its op, its producers (unit names or ``"input"``), its attributes."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict = field(default_factory=dict)


@dataclass
class NumpyUnit:
    name: str
    op: str
    inputs: list[Array]
    outputs: list[Array]
    grad_outputs: list[Array] = field(default_factory=list)
    grad_inputs: list[Array] = field(default_factory=list)
    param_grads: dict[str, Array] = field(default_factory=dict)
    buffers_after: dict[str, Array] = field(default_factory=dict)


@dataclass
class NumpyTrace:
    """Per-unit records keyed by our qualified module names, in forward order; plus logits and loss."""

    units: dict[str, NumpyUnit]
    logits: Array
    loss: float

    def __getitem__(self, name: str) -> NumpyUnit:
        return self.units[name]

    def __contains__(self, name: object) -> bool:
        return name in self.units

    @property
    def forward_order(self) -> list[str]:
        return list(self.units)


def build_specs(config: dict) -> list[UnitSpec]:
    """The units of ``DenseNet(**config)`` in forward order, named as in ``named_modules()``."""
    required = ("depth", "growth_rate", "bottleneck", "compression", "num_init_features")
    missing = [k for k in required if k not in config]
    if missing:
        raise UsageError(f"model config lacks {', '.join(missing)}: not a densenet_debug DenseNet")
    if float(config.get("drop_rate", 0.0)) > 0:
        raise UsageError("the NumPy oracle cannot reproduce dropout masks: use a model with drop_rate=0")
    depth, bc = int(config["depth"]), bool(config["bottleneck"])
    n = (depth - 4) // 3 // (2 if bc else 1)
    specs = [UnitSpec("stem", "conv", ["input"], {"stride": 1, "padding": 1})]
    prev = "stem"
    for b in (1, 2, 3):
        width = max(len(str(n)), 2)
        features = [prev]
        for i in range(n):
            p = f"block{b}.layer{i + 1:0{width}d}"
            specs.append(UnitSpec(f"{p}.cat", "cat", list(features)))
            specs += [UnitSpec(f"{p}.norm1", "bn", [f"{p}.cat"]), UnitSpec(f"{p}.relu1", "relu", [f"{p}.norm1"])]
            specs.append(UnitSpec(f"{p}.conv1", "conv", [f"{p}.relu1"], {"stride": 1, "padding": 0 if bc else 1}))
            out = f"{p}.conv1"
            if bc:
                specs += [UnitSpec(f"{p}.norm2", "bn", [out]), UnitSpec(f"{p}.relu2", "relu", [f"{p}.norm2"]),
                          UnitSpec(f"{p}.conv2", "conv", [f"{p}.relu2"], {"stride": 1, "padding": 1})]
                out = f"{p}.conv2"
            features.append(out)
        specs.append(UnitSpec(f"block{b}.cat", "cat", list(features)))
        prev = f"block{b}.cat"
        if b < 3:
            t = f"trans{b}"
            specs += [UnitSpec(f"{t}.norm", "bn", [prev]), UnitSpec(f"{t}.relu", "relu", [f"{t}.norm"]),
                      UnitSpec(f"{t}.conv", "conv", [f"{t}.relu"], {"stride": 1, "padding": 0}),
                      UnitSpec(f"{t}.pool", "avgpool", [f"{t}.conv"], {"k": 2})]
            prev = f"{t}.pool"  # widths (growth rate, compression) come from the state dict's shapes
    specs += [UnitSpec("head.norm", "bn", [prev]), UnitSpec("head.relu", "relu", ["head.norm"]),
              UnitSpec("head.pool", "gap", ["head.relu"]), UnitSpec("head.flatten", "flatten", ["head.pool"]),
              UnitSpec("head.fc", "linear", ["head.flatten"])]
    return specs


PARAMS = {"conv": ("weight",), "bn": ("weight", "bias"), "linear": ("weight", "bias")}


def unit_forward(spec: UnitSpec, xs: list[Array], state: dict[str, Array], train: bool
                 ) -> tuple[Array, object, dict[str, Array]]:
    """(output, cache for the backward, buffers after) of one unit on inputs ``xs``."""
    p = spec.name
    if spec.op == "conv":
        y, cache = ops.conv2d_forward(xs[0], state[f"{p}.weight"], spec.attrs["stride"], spec.attrs["padding"])
        return y, cache, {}
    if spec.op == "bn":
        y, cache, rm, rv = ops.batch_norm_forward(
            xs[0], state[f"{p}.weight"], state[f"{p}.bias"], state[f"{p}.running_mean"],
            state[f"{p}.running_var"], train, BN_MOMENTUM, BN_EPS)
        return y, cache, ({"running_mean": rm, "running_var": rv} if train else {})
    if spec.op == "relu":
        y, cache = ops.relu_forward(xs[0])
        return y, cache, {}
    if spec.op == "cat":
        y, cache = ops.concat_forward(xs, 1)
        return y, cache, {}
    if spec.op == "avgpool":
        y, cache = ops.avg_pool2d_forward(xs[0], spec.attrs["k"])
        return y, cache, {}
    if spec.op == "gap":
        y, cache = ops.global_avg_pool_forward(xs[0])
        return y, cache, {}
    if spec.op == "flatten":
        y, cache = ops.flatten_forward(xs[0])
        return y, cache, {}
    if spec.op == "linear":
        y, cache = ops.linear_forward(xs[0], state[f"{p}.weight"], state.get(f"{p}.bias"))
        return y, cache, {}
    raise ValueError(f"unknown op {spec.op}")


def unit_backward(spec: UnitSpec, gy: Array, cache: object) -> tuple[list[Array], dict[str, Array]]:
    """(grad_inputs, param_grads) of one unit."""
    if spec.op == "conv":
        gx, gw = ops.conv2d_backward(gy, cache)
        return [gx], {"weight": gw}
    if spec.op == "bn":
        gx, gg, gb = ops.batch_norm_backward(gy, cache)
        return [gx], {"weight": gg, "bias": gb}
    if spec.op == "relu":
        return [ops.relu_backward(gy, cache)], {}
    if spec.op == "cat":
        return ops.concat_backward(gy, cache, 1), {}
    if spec.op == "avgpool":
        return [ops.avg_pool2d_backward(gy, cache)], {}
    if spec.op == "gap":
        return [ops.global_avg_pool_backward(gy, cache)], {}
    if spec.op == "flatten":
        return [ops.flatten_backward(gy, cache)], {}
    if spec.op == "linear":
        gx, gw, gb = ops.linear_backward(gy, cache)
        return [gx], {"weight": gw, "bias": gb}
    raise ValueError(f"unknown op {spec.op}")


def numpy_forward_backward(state_dict_numpy: dict[str, Array], config: dict, x: Array, y: Array, *,
                           train: bool = True) -> NumpyTrace:
    """Forward, mean cross-entropy and backward of the DenseNet ``config`` with weights ``state_dict_numpy``.

    Returns every unit's inputs, outputs, grad_outputs, grad_inputs, parameter gradients and (train)
    running statistics after the step, keyed by the PyTorch module names.
    """
    state = {k: np.asarray(v, dtype=np.float64) for k, v in state_dict_numpy.items()}
    specs = build_specs(config)
    _check_state(specs, state)
    values: dict[str, Array] = {"input": np.asarray(x, dtype=np.float64)}
    caches: dict[str, object] = {}
    units: dict[str, NumpyUnit] = {}
    for spec in specs:
        xs = [values[i] for i in spec.inputs]
        out, caches[spec.name], buffers = unit_forward(spec, xs, state, train)
        values[spec.name] = out
        units[spec.name] = NumpyUnit(spec.name, spec.op, xs, [out], buffers_after=buffers)
    logits = values[specs[-1].name]
    loss, ce = ops.cross_entropy_forward(logits, np.asarray(y, dtype=np.int64))
    grads: dict[str, Array] = {specs[-1].name: ops.cross_entropy_backward(ce)}
    for spec in reversed(specs):
        gy = grads.pop(spec.name, None)
        if gy is None:
            gy = np.zeros_like(values[spec.name])
        gxs, pgrads = unit_backward(spec, gy, caches.pop(spec.name))
        unit = units[spec.name]
        unit.grad_outputs, unit.grad_inputs, unit.param_grads = [gy], gxs, pgrads
        for producer, g in zip(spec.inputs, gxs):
            grads[producer] = g if producer not in grads else grads[producer] + g
    return NumpyTrace(units, logits, loss)


def _check_state(specs: list[UnitSpec], state: dict[str, Array]) -> None:
    needed = [f"{s.name}.{p}" for s in specs for p in PARAMS.get(s.op, ())]
    needed += [f"{s.name}.{b}" for s in specs if s.op == "bn" for b in ("running_mean", "running_var")]
    missing = [k for k in needed if k not in state]
    if missing:
        raise UsageError(f"state dict does not match the config: missing {missing[0]} (and {len(missing) - 1} more)")
