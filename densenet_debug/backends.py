"""Named numerical backends, composable with ``+``: ``mkldnn``, ``cudnn+channels_last``, ``native+fault:NAME@LAYER``.

A :class:`Backend` converts a model and its inputs (device, dtype, memory format, compilation, planted
faults) and, through :meth:`Backend.active`, sets *every* flag that picks kernels or their precision and
restores all of them on exit. Everything it runs (forward, backward, local replays) runs inside
``active()``. ``torch.backends.cudnn.flags()`` resets each flag it is not given, so flags are always passed
in full.

CPU components: ``native`` (oneDNN off: PyTorch's own direct kernels), ``mkldnn``/``onednn`` (oneDNN on),
``fp64``, ``channels_last``, ``bf16`` (autocast), ``compile``. CUDA components: ``cudnn``, ``no-cudnn``,
``cudnn-benchmark``, ``cudnn-deterministic``, ``tf32``, ``fp16``, ``bf16``, ``channels_last``, ``compile``. Modifiers:
``fault:NAME[@LAYER][=MAG]`` (planted faults, :mod:`densenet_debug.faults.registry`) and ``compile:BACKEND``
(a ``torch.compile`` backend such as ``aot_eager``).

NNPACK is off in every backend. With oneDNN off, PyTorch runs a float32 stride-1 convolution through NNPACK
once the batch reaches 16: Winograd F(6x6, 3x3) for 3x3 kernels, FFT tiles for others. Its transforms add
rounding that a direct sum's error model does not cover (measured on BC-100's stem at batch 16: 323·u·Σ|terms|,
against 4.5·u·Σ|terms| for the direct kernel), so ``native`` at batch 16 would be a different algorithm from
``native`` at batch 8 and false-alarm. There is no ``nnpack`` component until such transforms have a derived bound.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from densenet_debug.errors import UsageError

U64 = 2.0**-53  # float64's unit roundoff: the one definition (the NumPy oracle's and gradcheck's bounds use it)
UNIT_ROUNDOFF = {
    torch.float64: U64,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
TF32_ROUNDOFF = 2.0**-11  # TF32 keeps 10 explicit mantissa bits of an fp32 operand


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of a floating dtype (half the distance from 1 to the next number); 0 for integers (exact)."""
    return UNIT_ROUNDOFF.get(dtype, 0.0)


@dataclass(frozen=True)
class Component:
    name: str
    help: str
    devices: tuple[str, ...]
    settings: dict = field(default_factory=dict)


_BOTH = ("cpu", "cuda")
COMPONENTS: dict[str, Component] = {c.name: c for c in [
    Component("native", "CPU kernels with oneDNN (mkldnn) and NNPACK disabled", ("cpu",), {"mkldnn": False}),
    Component("mkldnn", "CPU kernels with oneDNN (mkldnn) enabled", ("cpu",), {"mkldnn": True}),
    Component("onednn", "alias of mkldnn", ("cpu",), {"mkldnn": True}),
    Component("fp64", "model and inputs in float64", _BOTH, {"dtype": torch.float64}),
    Component("channels_last", "model and inputs in channels_last memory format", _BOTH, {"channels_last": True}),
    Component("bf16", "autocast to bfloat16", _BOTH, {"autocast": torch.bfloat16}),
    Component("fp16", "autocast to float16", ("cuda",), {"autocast": torch.float16}),
    Component("compile", "torch.compile (inductor) of every unit, forward and backward", _BOTH,
              {"compile": "inductor"}),
    Component("cudnn", "cuDNN enabled, benchmark off, deterministic off, TF32 off", ("cuda",), {"cudnn": True}),
    Component("no-cudnn", "cuDNN disabled (native CUDA kernels)", ("cuda",), {"cudnn": False}),
    Component("cudnn-benchmark", "cuDNN with benchmark=True (autotuned algorithms)", ("cuda",),
              {"cudnn": True, "benchmark": True}),
    Component("cudnn-deterministic", "cuDNN with deterministic=True", ("cuda",),
              {"cudnn": True, "deterministic": True}),
    Component("tf32", "TF32 for cuDNN convolutions and cuBLAS matmuls", ("cuda",), {"tf32": True}),
]}


def backend_names(device: str | None = None) -> list[str]:
    names = [n for n, c in COMPONENTS.items() if device is None or device in c.devices]
    return names + ["fault:NAME[@LAYER][=MAG]", "compile:BACKEND"]


class Backend:
    """One named configuration. Build it with :func:`parse_backend`.

    ``dtype`` is the compute dtype (the autocast dtype under ``bf16``/``fp16``); ``param_dtype`` the dtype
    the parameters are stored in; ``unit_roundoff`` the u of the compute precision (TF32's 2**-11 for
    conv/matmul operands under ``tf32``).
    """

    def __init__(self, name: str, device: torch.device, settings: dict, faults: list, compile_backend: str | None):
        self.name = name
        self.device = device
        self.settings = settings
        self.faults = faults
        self.compile_backend = compile_backend
        self.param_dtype: torch.dtype = settings.get("dtype", torch.float32)
        self.autocast: torch.dtype | None = settings.get("autocast")
        self.dtype: torch.dtype = self.autocast or self.param_dtype
        self.channels_last: bool = bool(settings.get("channels_last"))
        self.tf32: bool = bool(settings.get("tf32")) and self.dtype == torch.float32
        self.unit_roundoff = TF32_ROUNDOFF if self.tf32 else unit_roundoff(self.dtype)
        self.accumulate_roundoff = unit_roundoff(torch.float64 if self.param_dtype == torch.float64
                                                 else torch.float32)
        self._in_force: dict = {}

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, device={self.device})"

    # -- precision -------------------------------------------------------------------------------------
    def matmul_operand_roundoff(self, unit: str | None = None) -> float:
        """u with which conv/linear operands enter the multiply: TF32 and autocast round them first."""
        u = self.unit_roundoff
        for fault in self.faults:
            override = getattr(fault, "unit_roundoff", None)
            value = override(unit) if callable(override) and unit is not None else None
            if value is not None:
                u = max(u, value)
        return u

    @property
    def needs(self) -> dict:
        """What the planted faults need from the harness (``steps``, ``eval``...), merged."""
        merged: dict = {}
        for fault in self.faults:
            for key, value in getattr(fault, "needs", {}).items():
                merged[key] = max(merged.get(key, value), value) if isinstance(value, (int, float)) else value
        return merged

    # -- conversion ------------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """A converted deep copy: device, parameter dtype, memory format, compilation, then planted faults."""
        out = copy.deepcopy(model)
        out.to(device=self.device, dtype=self.param_dtype)
        if self.channels_last:
            out.to(memory_format=torch.channels_last)
        if self.compile_backend:
            _compile_units(out, self.compile_backend)
        for fault in self.faults:
            fault.apply(out)
        return out

    def prepare_input(self, x: Tensor) -> Tensor:
        x = x.to(device=self.device, dtype=self.param_dtype if x.is_floating_point() else x.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    # -- flags -----------------------------------------------------------------------------------------
    def _wanted(self) -> dict:
        s = self.settings
        cuda = self.device.type == "cuda"
        return {
            "mkldnn.enabled": s.get("mkldnn", True),
            "mkldnn.deterministic": False,
            "nnpack.enabled": False,  # see the module docstring
            "cudnn.enabled": s.get("cudnn", True) if cuda else torch.backends.cudnn.enabled,
            "cudnn.benchmark": bool(s.get("benchmark", False)),
            "cudnn.deterministic": bool(s.get("deterministic", False)),
            "cudnn.allow_tf32": self.tf32,
            "cuda.matmul.allow_tf32": self.tf32,
            "autocast": str(self.autocast).replace("torch.", "") if self.autocast else None,
            "dtype": str(self.param_dtype).replace("torch.", ""),
            "memory_format": "channels_last" if self.channels_last else "contiguous",
            "compile": self.compile_backend,
            "faults": [repr(f) for f in self.faults],
        }

    @contextmanager
    def active(self) -> Iterator[None]:
        """Set every kernel-choosing flag for this backend; restore all on exit (also on error)."""
        want = self._wanted()
        tf32_precision = "tf32" if self.tf32 else "ieee"
        with ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message=".*TF32 acceleration on top of oneDNN.*")
            stack.enter_context(torch.backends.mkldnn.flags(
                enabled=want["mkldnn.enabled"], deterministic=False, allow_tf32=False, fp32_precision="none"))
            stack.enter_context(torch.backends.nnpack.flags(enabled=want["nnpack.enabled"]))
            stack.enter_context(torch.backends.cudnn.flags(
                enabled=want["cudnn.enabled"], benchmark=want["cudnn.benchmark"], benchmark_limit=10,
                deterministic=want["cudnn.deterministic"], allow_tf32=self.tf32, fp32_precision="none",
                depthwise_kernel="auto"))
            stack.enter_context(_matmul_tf32(self.tf32))
            if self.autocast is not None:
                stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast))
            for fault in self.faults:  # a fault planted as a kernel (the precision controls): below any capture
                kernel = getattr(fault, "kernel", None)
                mode = kernel() if callable(kernel) else None
                if mode is not None:
                    stack.enter_context(mode)
            if self.compile_backend:
                # Every unit is its own compiled frame; the default limit would silently fall back to eager.
                stack.enter_context(_dynamo().config.patch(recompile_limit=100_000,
                                                               accumulated_recompile_limit=100_000))
            self._in_force = _read_flags(want, tf32_precision)
            yield

    def flags_in_force(self) -> dict:
        """The flags as read back inside the last :meth:`active` (or as they would be set).

        Under ``compile`` it also counts the graphs dynamo compiled so far, so a silent fallback to eager shows.
        """
        flags = dict(self._in_force) if self._in_force else _read_flags(self._wanted(), "")
        if self.compile_backend:
            flags["compiled_graphs"] = int(_dynamo().utils.counters["stats"].get("unique_graphs", 0))
        return flags


_UNIT: ContextVar[str | None] = ContextVar("densenet_debug_unit", default=None)


@contextmanager
def running_unit(name: str | None) -> Iterator[None]:
    """Ops run in this block belong to unit ``name`` (a qualified module name): a planted unit's forward says
    so, and so does a replay of one op of it, so a fault planted as a kernel computes the same in both."""
    token = _UNIT.set(name)
    try:
        yield
    finally:
        _UNIT.reset(token)


def current_unit() -> str | None:
    """The unit named by the innermost :func:`running_unit`, or None."""
    return _UNIT.get()


@contextmanager
def _matmul_tf32(enabled: bool) -> Iterator[None]:
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = enabled
        yield
    finally:
        matmul.allow_tf32 = saved


def _read_flags(want: dict, tf32_precision: str) -> dict:
    """What torch reports now, next to what the backend asked for."""
    got = dict(want)
    got["mkldnn.enabled"] = torch.backends.mkldnn.enabled
    got["mkldnn.deterministic"] = torch.backends.mkldnn.deterministic
    got["nnpack.enabled"] = bool(torch._C._get_nnpack_enabled())
    got["cudnn.enabled"] = torch.backends.cudnn.enabled
    got["cudnn.benchmark"] = torch.backends.cudnn.benchmark
    got["cudnn.deterministic"] = torch.backends.cudnn.deterministic
    got["cudnn.allow_tf32"] = torch.backends.cudnn.allow_tf32
    got["cuda.matmul.allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    got["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    got["autocast_enabled"] = any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))
    return got


def _compile_units(model: nn.Module, backend: str) -> None:
    """Compile each leaf unit's forward separately, so per-unit hooks and replays see compiled kernels."""
    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()):
            module.forward = torch.compile(module.forward, backend=backend, dynamic=False)


def environment() -> dict:
    """Versions that decide numerics: torch, CUDA, cuDNN, oneDNN, the CPU capability and the GPU."""
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "onednn": _onednn_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return env


def _onednn_version() -> str | None:
    for line in torch.__config__.show().splitlines():
        if "MKL-DNN" in line or "oneDNN" in line:
            return line.strip().lstrip("- ")
    return None


def parse_backend(spec: str | Backend, device: str | torch.device | None = None) -> Backend:
    """Parse ``"mkldnn"``, ``"cudnn+channels_last"``, ``"native+fault:NAME@LAYER"`` into a :class:`Backend`.

    Unknown names raise :class:`UsageError` listing the valid ones; a CUDA component without CUDA, or on a
    CPU device, raises one clear line too.
    """
    if isinstance(spec, Backend):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError("empty backend name; valid: " + ", ".join(backend_names()))
    parts = [p.strip() for p in spec.split("+")]
    if any(not p for p in parts):
        raise UsageError(f"bad backend {spec!r}: empty component between '+'")
    comps, fault_texts, compile_backend = [], [], None
    for part in parts:
        if part.startswith("fault:"):
            fault_texts.append(part[len("fault:"):])
        elif part.startswith("compile:"):
            compile_backend = part[len("compile:"):]
            if not compile_backend:
                raise UsageError("compile: needs a torch.compile backend name, e.g. compile:aot_eager")
        elif part in COMPONENTS:
            comps.append(COMPONENTS[part])
        else:
            raise UsageError(f"unknown backend {part!r}; valid: {', '.join(backend_names())}")
    needs_cuda = [c.name for c in comps if c.devices == ("cuda",)]
    needs_cpu = [c.name for c in comps if c.devices == ("cpu",)]
    dev = _resolve_device(device, needs_cuda)
    if needs_cuda and dev.type != "cuda":
        raise UsageError(f"backend {'+'.join(needs_cuda)} needs a CUDA device, got {dev}")
    if needs_cpu and dev.type != "cpu":
        raise UsageError(f"backend {'+'.join(needs_cpu)} is a CPU backend; on {dev} use cudnn or no-cudnn")
    settings: dict = {}
    for comp in comps:
        for key, value in comp.settings.items():
            if key in settings and settings[key] != value:
                raise UsageError(f"backend {spec!r}: {comp.name} conflicts with another component ({key})")
            settings[key] = value
    if settings.get("dtype") == torch.float64 and settings.get("autocast"):
        raise UsageError(f"backend {spec!r}: fp64 cannot be combined with autocast (bf16/fp16)")
    if settings.get("compile"):
        compile_backend = compile_backend or settings["compile"]
    if compile_backend and compile_backend not in _compile_backends():
        raise UsageError(f"unknown torch.compile backend {compile_backend!r}; valid: "
                         f"{', '.join(_compile_backends())}")
    faults = [_make_fault(t) for t in fault_texts]
    return Backend("+".join(parts), dev, settings, faults, compile_backend)


def _resolve_device(device: str | torch.device | None, needs_cuda: list[str]) -> torch.device:
    if device is None:
        if needs_cuda and not torch.cuda.is_available():
            raise UsageError(f"backend {'+'.join(needs_cuda)} needs CUDA, but torch.cuda.is_available() is "
                             "False on this machine")
        return torch.device("cuda" if needs_cuda else "cpu")
    return check_device(device)


def check_device(device: str | torch.device) -> torch.device:
    """A device the user named, usable here: cpu, or cuda[:N] when CUDA is available (UsageError otherwise)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"bad device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {dev} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {dev}; use cpu or cuda[:N]")
    return dev


def _dynamo():  # noqa: ANN202 - imported lazily: importing torch._dynamo costs seconds
    import torch._dynamo as dynamo

    return dynamo


def _compile_backends() -> list[str]:
    return sorted(set(_dynamo().list_backends(exclude_tags=())) | {"eager", "aot_eager"})


def _make_fault(text: str):  # noqa: ANN202 - the fault type lives in densenet_debug.faults.registry
    from densenet_debug.faults.registry import make_fault

    return make_fault(text)


def default_pair(device: torch.device | None = None) -> tuple[str, str]:
    """``cudnn`` vs ``no-cudnn`` where CUDA is present, else ``mkldnn`` vs ``native``."""
    cuda = (device.type == "cuda") if device is not None else torch.cuda.is_available()
    return ("cudnn", "no-cudnn") if cuda else ("mkldnn", "native")


def resolve_device(name: str | None) -> torch.device:
    """``--device``: cuda when present and not named, else the named device, checked."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(name)


@contextmanager
def one_thread() -> Iterator[None]:
    """Float64 results depend on the thread count (blocked reductions): truths and references use one."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
