"""Planted faults: faithful small copies of historical backend bugs, plus precision controls.

A fault is switched on as a backend modifier (``mkldnn+fault:cat_backward_slice_offset@block2.layer02.cat``)
and planted in place on a prepared model copy: the unit keeps its parameters, buffers and qualified name;
its instances' ``forward`` becomes one from :mod:`densenet_debug.faults.ops` (through a same-named subclass,
so ``type(unit).forward`` is still the stock op). Nothing in torch is edited. A planted unit runs eagerly.
The precision controls (``tf32_round``, ``reordered_sum``) are kernels instead: their units' forward only names
the unit, and :meth:`Fault.kernel` gives the dispatch mode that ``Backend.active()`` enters below any capture
(:mod:`densenet_debug.faults.kernels`), so a captured step and an op-by-op replay compute them alike.

Spec grammar: ``NAME[@LAYER][=MAG]``. ``LAYER`` is a qualified module name or ``*`` (every unit where the
fault is visible); without it, one such unit is drawn from ``seed``. ``MAG`` is the fault's magnitude knob
(its meaning is per fault, see :data:`FAULTS`). Sources: the team's backend bug catalog (reference notes
kept beside the repository, not in it); each fault's ``origin`` names the bug it copies.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from densenet_debug.backends import TF32_ROUNDOFF
from densenet_debug.errors import UsageError
from densenet_debug.faults import ops
from densenet_debug.models.densenet import Concat, _DenseBlock, _DenseLayer


@dataclass(frozen=True)
class FaultSpec:
    """One kind of fault: what it breaks, where it can go, and what a harness needs to see it."""

    name: str
    origin: str  # the historical bug it copies
    summary: str
    target: str  # the unit kind it plants on, for messages
    forward: ops.Forward
    applicable: Callable[[str, nn.Module], bool]
    passes: str  # where a detector must localise it: "forward" (outputs, buffers) or "backward"
    needs: dict = field(default_factory=dict)
    control: bool = False
    in_math: bool = False  # a backward inconsistent with its forward: a gradient checker must fail it
    mag: float = 1.0
    mag_meaning: str = ""


# -- where each fault can go ---------------------------------------------------------------------------
def _is_conv(name: str, m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and not isinstance(m.padding, str) and m.padding_mode == "zeros"
            and not m.transposed)


def _is_conv_or_bn(name: str, m: nn.Module) -> bool:
    return _is_conv(name, m) or isinstance(m, nn.BatchNorm2d)


def _is_dense_conv(name: str, m: nn.Module) -> bool:
    return _is_conv(name, m) and m.groups == 1 and m.in_channels >= 2


def _is_bn(name: str, m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d)


def _is_bn_with_stats(name: str, m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d) and m.track_running_stats


def _is_cat(name: str, m: nn.Module) -> bool:
    return isinstance(m, Concat)


def _is_avg_pool(name: str, m: nn.Module) -> bool:
    return isinstance(m, nn.AvgPool2d) and not m.ceil_mode


def _is_checkpointed_layer(name: str, m: nn.Module) -> bool:
    return isinstance(m, _DenseLayer) and m.memory_efficient


_BACKWARD_BN = ops.bn_backward_fault_forward

FAULTS: dict[str, FaultSpec] = {s.name: s for s in [
    FaultSpec("strided_read_as_contiguous", "pytorch#708 (cuDNN conv, Feb 2017; the DenseNet seed bug), PR #2000 (BN)",
              "conv (or BN) backward reads a non-contiguous grad_output (a cat-backward slice) with contiguous "
              "strides from its storage offset: sample 0 right, samples >= 1 wrong, invisible at batch 1",
              "Conv2d or BatchNorm2d", ops.strided_read_forward, _is_conv_or_bn, "backward", needs={"min_batch": 2},
              in_math=True),
    FaultSpec("cat_backward_slice_offset", "storage-offset bookkeeping (catalog 3.2)",
              "cat backward hands input i the grad slice MAG channels past its own (wrapping)",
              "Concat", ops.shifted_cat_forward, _is_cat, "backward", in_math=True, mag=1.0,
              mag_meaning="channels of shift"),
    FaultSpec("cat_forward_permuted", "pytorch#99686 (Inductor split+cat rewrite)",
              "cat forward concatenates its inputs in reverse order; the total shape is unchanged",
              "Concat", ops.permuted_cat_forward, _is_cat, "forward"),
    FaultSpec("stale_grad_accumulate", "executorch#21686 (grad buffer not zeroed before scatter-add)",
              "conv backward adds MAG x the previous call's grad_input/grad_weight: invisible on the first "
              "backward, wrong from the second on", "Conv2d", ops.conv_forward, _is_conv, "backward",
              needs={"steps": 2}, mag=1.0, mag_meaning="weight of the stale buffer"),
    FaultSpec("bn_eval_backward_uses_batch_stats", "pytorch#586 (cuDNN BN backward in eval mode)",
              "eval-mode BN forward uses running stats, its backward the train formula with batch stats",
              "BatchNorm2d", _BACKWARD_BN, _is_bn, "backward", needs={"eval": True}, in_math=True),
    FaultSpec("bn_invstd_as_var", "FlagGems#5222 (cudnn_batch_norm_backward)",
              "BN backward treats the saved inverse std as a variance: rsqrt(invstd + eps)",
              "BatchNorm2d", _BACKWARD_BN, _is_bn, "backward", in_math=True),
    FaultSpec("bn_layout_mislabel", "pytorch#64039/#64100, #175189 (BN backward layout)",
              "BN backward reads its NCHW input bytes as if they were NHWC", "BatchNorm2d", _BACKWARD_BN,
              _is_bn, "backward", in_math=True),
    FaultSpec("partial_channel_tile", "pytorch#57077 (SyncBN launch config), apex#1768",
              "BN backward writes only the first MAG fraction of channels; the rest stay zero", "BatchNorm2d",
              _BACKWARD_BN, _is_bn, "backward", in_math=True, mag=0.5, mag_meaning="fraction of channels written"),
    FaultSpec("pool_pad_offset", "pytorch#188344 (CUDA NHWC avg_pool2d backward, padding > 0)",
              "avg-pool backward maps input pixel x to the windows of x - pad; invisible when padding is 0",
              "AvgPool2d", ops.pool_pad_offset_forward, _is_avg_pool, "backward", needs={"pool_padding": 1},
              in_math=True),
    FaultSpec("bn_unbiased_normalisation", "semantics of pytorch#4253/#19902",
              "train-mode BN normalises with the variance times 1 + MAG/(M-1) (MAG=1: the unbiased one)",
              "BatchNorm2d", ops.bn_unbiased_forward, _is_bn, "forward", mag=1.0,
              mag_meaning="multiple of the unbiased correction"),
    FaultSpec("bn_double_stat_update", "pytorch#96136 (BN under checkpoint recompute)",
              "BN running stats get MAG extra momentum updates per step; gradients are unchanged",
              "BatchNorm2d", ops.bn_double_update_forward, _is_bn_with_stats, "forward", needs={"buffers": True},
              mag=1.0, mag_meaning="extra updates per step"),
    FaultSpec("checkpoint_detached_inputs", "torchvision#2221 (memory-efficient DenseNet)",
              "the checkpointed cat+BN+ReLU+1x1 runs on detached inputs: its parameters get no gradient and "
              "none flows back through it", "memory-efficient dense layer", ops.detached_checkpoint_forward,
              _is_checkpointed_layer, "backward", needs={"memory_efficient": True}),
    FaultSpec("tf32_round", "control: TF32 tensor cores (cudnn.allow_tf32)",
              "conv operands (and grad_output) rounded to TF32's 10-bit mantissa, to nearest: precision, not a bug",
              "Conv2d", ops.kernel_forward, _is_conv, "forward", control=True),
    FaultSpec("reordered_sum", "control: another reduction order",
              "conv whose every sum (over input channels; output channels for grad_input; the batch for grad_weight "
              "and grad_bias) is split into MAG chunks added last-to-first: must never be flagged",
              "Conv2d", ops.kernel_forward, _is_dense_conv, "forward", control=True, mag=3.0,
              mag_meaning="chunks"),
]}



# -- what the op engine sees of each fault -----------------------------------------------------------------
@dataclass(frozen=True)
class OpSight:
    """What the op engine (:func:`~densenet_debug.verdict.ops.judge.judge_ops`) must find of a planted fault.

    ``ops``: the aten ops (base names, ``"convolution_backward"``) a finding at the planted unit must be at; empty:
    any op of the unit. ``how``: what the op engine sees there. ``blind``: why it cannot see the fault at all
    (then ``ops`` is empty and no finding is required). ``steps``: the step it shows in (the fault's state after
    the earlier steps carried into the judged one).
    """

    ops: tuple[str, ...] = ()
    how: str = ""
    blind: str = ""
    steps: int = 1


_HAND_WRITTEN = ("the planted Function computes in elementwise ops the oracle does not run (it runs the stock "
                 "kernel): side-only ops that change values, findings by the op engine's rule. The same Function "
                 "without the fault would be flagged alike; whether its arithmetic is right is the Function "
                 "unit's question (diff's module engine, gradcheck)")
OP_SIGHTS: dict[str, OpSight] = {
    "strided_read_as_contiguous": OpSight(("convolution_backward",), "the side-only as_strided of the Function's "
                                          "backward is replayed in front of convolution_backward, which then reads "
                                          "outside the cat slice it was given (NaN there): the #708 read"),
    "cat_backward_slice_offset": OpSight(("slice",), "the cat backward's slices start MAG channels off the oracle's"),
    "cat_forward_permuted": OpSight(("slice",), "the forward cat computes right on the operands it is handed (their "
                                    "order is wiring, the module unit's to see); its backward slices follow the "
                                    "permuted sizes and offsets, not the oracle's"),
    "stale_grad_accumulate": OpSight(("add",), "from the second backward on, the Function adds MAG x its stale "
                                     "buffer: a side-only add that changes values", steps=2),
    "bn_eval_backward_uses_batch_stats": OpSight((), _HAND_WRITTEN),
    "bn_invstd_as_var": OpSight((), _HAND_WRITTEN),
    "bn_layout_mislabel": OpSight((), _HAND_WRITTEN),
    "partial_channel_tile": OpSight((), _HAND_WRITTEN),
    "pool_pad_offset": OpSight((), _HAND_WRITTEN),
    "bn_unbiased_normalisation": OpSight((), "the forward normalises in elementwise ops the oracle does not run "
                                         "(it runs native_batch_norm): side-only ops that change values"),
    "bn_double_stat_update": OpSight(("native_batch_norm",), "a second batch norm the oracle does not run writes the "
                                     "running statistics: a side-only op that changes values"),
    "checkpoint_detached_inputs": OpSight(("native_batch_norm_backward",), "no gradient enters the detached front: "
                                          "the bottleneck's norm2 backward computes no grad_input (an output "
                                          "missing where the oracle's has one)"),
    "tf32_round": OpSight(how="one aten.convolution (and convolution_backward) with TF32 operands, replayed as "
                          "such and bounded with TF32's unit roundoff"),
    "reordered_sum": OpSight(how="one aten.convolution (and convolution_backward) summing in another order, within "
                             "the conv error models"),
}


def op_sight(name: str, unit: nn.Module) -> OpSight:
    """:data:`OP_SIGHTS` for fault ``name`` planted at ``unit`` (two faults show differently by unit kind)."""
    sight = OP_SIGHTS[_spec(name).name]
    if name == "strided_read_as_contiguous" and isinstance(unit, nn.BatchNorm2d):
        return OpSight((), "the BN sibling: " + _HAND_WRITTEN)
    if name == "checkpoint_detached_inputs" and not getattr(unit, "bottleneck", True):
        return OpSight(blind="without a bottleneck the whole layer runs detached: its ops vanish from the side's "
                             "backward (oracle-only ops are listed, not findings) and every op the side runs is "
                             "right; a missing path between correct ops is the module units' to see")
    return sight


CONTROLS = [n for n, s in FAULTS.items() if s.control]
BUGS = [n for n, s in FAULTS.items() if not s.control]


# -- where a fault is visible (not just applicable) ----------------------------------------------------
def _cat_arity(model: nn.Module) -> dict[str, int]:
    """Inputs of each DenseNet Concat: a dense layer's cat takes all features so far, the block's all."""
    arity: dict[str, int] = {}
    for name, block in model.named_modules():
        if isinstance(block, _DenseBlock):
            prefix = f"{name}." if name else ""
            for i, layer in enumerate(block.names):
                arity[f"{prefix}{layer}.cat"] = i + 1
            arity[f"{prefix}cat"] = len(block.names) + 1
    return arity


def _cat_slice_convs(model: nn.Module) -> set[str] | None:
    """Convs whose grad_output is a cat-backward slice: the last dense layer's last conv in each block.

    Its output feeds the block's cat only, so its gradient is a ``narrow`` of the cat's; every earlier
    layer's output feeds several cats and gets their (contiguous) sum. Dropout after it breaks the view.
    None for a model without dense blocks (a user model): there every conv counts.
    """
    blocks = [(n, b) for n, b in model.named_modules() if isinstance(b, _DenseBlock)]
    if not blocks:
        return None
    found = set()
    for name, block in blocks:
        layer = getattr(block, block.names[-1])
        if getattr(layer, "drop2", None) is None:
            prefix = f"{name}." if name else ""
            found.add(f"{prefix}{block.names[-1]}.{'conv2' if layer.bottleneck else 'conv1'}")
    return found


def eligible_units(name: str, model: nn.Module) -> list[str]:
    """Units of ``model`` where fault ``name`` can be planted and shows, in module order."""
    spec = _spec(name)
    units = [n for n, m in model.named_modules() if n and spec.applicable(n, m)]
    if name == "strided_read_as_contiguous":
        slices = _cat_slice_convs(model)
        units = units if slices is None else [n for n in units if n in slices]
    elif name in ("cat_backward_slice_offset", "cat_forward_permuted"):
        arity = _cat_arity(model)
        units = [n for n in units if arity.get(n, 2) >= 2]  # one input: nothing to shift or permute
    elif name == "pool_pad_offset":
        units = [n for n in units if any(_pad for _pad in ops.pair(dict(model.named_modules())[n].padding))]
    elif name == "partial_channel_tile":
        units = [n for n in units if dict(model.named_modules())[n].num_features >= 2]
    return units


# -- the fault object ----------------------------------------------------------------------------------
class Fault:
    """One planted fault, as ``parse_backend`` gets it from ``make_fault("NAME[@LAYER][=MAG]")``.

    Attributes: ``name``, ``control`` (a precision control, not a bug), ``layer`` (the unit, ``*`` for all
    eligible ones, or None until :meth:`apply` draws one), ``units`` (the units planted), ``needs`` (harness
    modes that make the fault visible: ``steps``, ``eval``, ``buffers``, ``min_batch``, ``pool_padding``,
    ``memory_efficient``), ``passes`` (the pass a detector must charge it to), ``mag``, and
    ``unit_roundoff_override`` (the unit roundoff the planted units actually compute with, for tf32_round) and
    ``carried`` (unit -> the fault's state a planting starts from, as an earlier step left it).
    """

    def __init__(self, name: str, layer: str | None = None, mag: float | None = None, seed: int = 0) -> None:
        self.spec = _spec(name)
        self.name = name
        self.control = self.spec.control
        self.layer = layer
        self.mag = self.spec.mag if mag is None else float(mag)
        self.seed = seed
        self.needs = dict(self.spec.needs)
        self.passes = self.spec.passes
        self.in_math = self.spec.in_math
        self.units: list[str] = []
        self.unit_roundoff_override = TF32_ROUNDOFF if name == "tf32_round" else None
        self._nodes: set[int] = set()  # autograd nodes of the planted units' convolutions (kernel())
        self.carried: dict[str, dict[str, Tensor]] = {}  # unit -> state a planting starts from (earlier steps)

    def __repr__(self) -> str:
        where = f"@{self.layer}" if self.layer else ""
        mag = f"={self.mag:g}" if self.mag != self.spec.mag else ""
        return f"Fault({self.name}{where}{mag})"

    def unit_roundoff(self, unit: str) -> float | None:
        """The unit roundoff ``unit`` computes with under this fault, or None where it is unchanged."""
        return self.unit_roundoff_override if unit in self.units else None

    def kernel(self) -> TorchDispatchMode | None:
        """A precision control's kernel mode for one ``Backend.active()`` (None for a bug: those are planted in
        the units' own forwards). Every mode of this fault shares the set of autograd nodes its units made."""
        if not self.control:
            return None
        from densenet_debug.faults.kernels import ControlKernel

        return ControlKernel(self.name, self.mag, self, self._nodes)

    def choose(self, model: nn.Module) -> list[str]:
        """The units :meth:`apply` would plant on, without touching the model.

        A named unit needs only the right kind (a pad-0 pool takes ``pool_pad_offset`` and, like the real
        kernel there, computes right); a drawn unit, or ``*``, is one where the fault shows.
        """
        if self.layer not in (None, "*"):
            modules = dict(model.named_modules())
            if self.layer not in modules:
                raise UsageError(f"fault {self.name}: no module named {self.layer!r} in the model")
            if not self.spec.applicable(self.layer, modules[self.layer]):
                raise UsageError(f"fault {self.name} plants on: {self.spec.target}; {self.layer} is a "
                                 f"{type(modules[self.layer]).__name__}")
            return [self.layer]
        eligible = eligible_units(self.name, model)
        if not eligible:
            raise UsageError(f"fault {self.name} has no eligible unit in this model (it plants on: "
                             f"{self.spec.target}{_needs_text(self.needs)})")
        if self.layer == "*":
            return eligible
        return [random.Random(f"{self.seed}:{self.name}").choice(eligible)]

    def apply(self, model: nn.Module) -> None:
        """Plant the fault in place: each chosen unit runs the faulty forward; its name and state stay."""
        units = self.choose(model)
        modules = dict(model.named_modules())
        for unit in units:
            if hasattr(modules[unit], "_fault"):
                raise UsageError(f"{unit} already has fault {modules[unit]._fault.name}; plant one per unit")
        for unit in units:
            module = modules[unit]
            state = {k: v.detach().clone() for k, v in self.carried.get(unit, {}).items()}
            module._fault = ops.FaultConfig(self.name, self.mag, state, unit)
            module.__dict__.pop("forward", None)  # an instance forward (a compiled one) would shadow the fault
            module.__class__ = ops.faulty_class(type(module), self.spec.forward)
        self.units = units
        if self.layer is None:
            self.layer = units[0]


def _spec(name: str) -> FaultSpec:
    if name not in FAULTS:
        raise UsageError(f"unknown fault {name!r}; known faults: {', '.join(FAULTS)}")
    return FAULTS[name]


def _needs_text(needs: dict) -> str:
    return f"; it needs {', '.join(f'{k}={v}' for k, v in needs.items())}" if needs else ""


def make_fault(text: str, seed: int = 0) -> Fault:
    """Parse ``NAME[@LAYER][=MAG]`` into a :class:`Fault` (not yet planted). Bad text raises UsageError."""
    rest, _, mag_text = text.partition("=")
    name, _, layer = rest.partition("@")
    name, layer = name.strip(), layer.strip() or None
    spec = _spec(name)
    mag = None
    if mag_text:
        try:
            mag = float(mag_text)
        except ValueError:
            raise UsageError(f"fault {name}: magnitude must be a number, got {mag_text!r}") from None
        if not mag > 0 or mag != mag or mag == float("inf"):
            raise UsageError(f"fault {name}: magnitude must be positive and finite, got {mag_text!r}")
        if not spec.mag_meaning:
            raise UsageError(f"fault {name} has no magnitude knob")
    return Fault(name, layer, mag, seed)


def planted(model: nn.Module) -> dict[str, str]:
    """Units of ``model`` that carry a planted fault: qualified name -> fault name."""
    return {n: m._fault.name for n, m in model.named_modules() if isinstance(getattr(m, "_fault", None),
                                                                               ops.FaultConfig)}
