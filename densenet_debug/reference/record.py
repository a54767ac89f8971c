"""Record a reference fixture: the float64 CPU truth of a model's training step, with how it was made.

:func:`record_reference` runs the oracle (``verdict.oracle_traces``: the same model, weights, inputs,
labels and BN state in float64 on the CPU, one thread so the bytes are reproducible), cross-checks it
against the independent NumPy oracle when the model is one of ours, and writes the fixture with
:func:`densenet_debug.reference.format.write_fixture`.

Storage policy. ``full`` keeps every quantity of every unit (deduplicated). A DenseNet-BC-100 step has
~475 MB of distinct float64 unit tensors, so large models use ``checkpoints``: every parameter gradient,
every BN buffer, the logits and the loss, plus the output and grad_output of every unit whose output feeds
a multi-input unit (in a DenseNet: the stem, each dense layer's new features, each transition) - the
tensors that everything else in the step is a function of. At check time the rest is recomputed in float64
and verified against the stored checkpoints (:mod:`densenet_debug.reference.check`). ``auto`` picks ``full``
when it fits in ``max_mb``.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from densenet_debug import __version__
from densenet_debug.backends import one_thread
from densenet_debug.capture.records import Capture
from densenet_debug.errors import UsageError
from densenet_debug.reference.format import ALL_QUANTITIES, DICT_QUANTITIES, calls_of, write_fixture
from densenet_debug.reference.meta import stored_model_spec
from densenet_debug.trace import Trace

POLICIES = ("auto", "full", "checkpoints")
DEFAULT_MAX_MB = 8.0
USER_MODULE_PREFIX = "_densenet_debug_user_"  # the module name models.resolve_model gives a user file
LOSS = "torch.nn.functional.cross_entropy (mean over the batch)"


class OracleDisagreement(Exception):
    """PyTorch float64 and the independent NumPy oracle disagree: the truth itself is in doubt."""


def structure(model: nn.Module) -> list[str]:
    """What a fixture's structure hash covers, one line per item, in registration order.

    Every module's name and type (class name without its module: a file imported from another directory, or
    by pytest under another module name, is the same model), and every parameter and buffer: name, shape,
    dtype. Weights are not in it (they are stored); behaviour is not (that is what the check judges).
    """
    lines = []
    for name, module in model.named_modules():
        lines.append(f"module {name} {type(module).__qualname__}")
        for kind, items in (("parameter", module.named_parameters(recurse=False)),
                            ("buffer", module.named_buffers(recurse=False))):
            for key, t in items:
                lines.append(f"{kind} {name + '.' if name else ''}{key} {tuple(t.shape)} {t.dtype}")
    return lines


def model_identity(model: nn.Module) -> dict:
    """Class, configuration and structure hash (SHA-256 of :func:`structure`) of ``model``."""
    config = getattr(model, "config", None)
    module = type(model).__module__
    if module.startswith(USER_MODULE_PREFIX):  # a file loaded by models.resolve_model: name it by its file
        module = Path(getattr(sys.modules.get(module), "__file__", None) or "user").stem
    return {
        "class": f"{module}.{type(model).__qualname__}",
        "config": dict(config) if isinstance(config, dict) else None,
        "structure_sha256": hashlib.sha256("\n".join(structure(model)).encode()).hexdigest(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }


def builder_of(model: nn.Module) -> str | None:
    """The builder name that makes exactly ``model``'s configuration, for our DenseNets (else None)."""
    from densenet_debug.models import BUILDERS, DenseNet

    config = getattr(model, "config", None)
    if not isinstance(model, DenseNet) or not isinstance(config, dict):
        return None
    for name, builder in BUILDERS.items():
        keys = getattr(builder, "keywords", {})
        if any(config.get(k) != v for k, v in keys.items()):
            continue  # cheap filter before building the one candidate
        candidate = builder(num_classes=config["num_classes"])
        if candidate.config == config:
            return name
    return None


def model_description(model: nn.Module, spec: str | None, factory_kwargs: dict | None) -> dict:
    """meta.json's ``model`` section: how to rebuild ``model``, and its identity.

    ``kind`` says how check-reference gets the model back. ``builder``: our own builder, rebuilt from meta.json
    alone (``BUILDERS[spec](**factory_kwargs)``). ``file``/``module``: a user's factory, stored as
    ``m.py:factory`` (file name only, so the fixture works from any directory) or ``package.module:factory``;
    a fixture never imports it: the user passes ``--model`` again, the factory is called with the stored
    ``factory_kwargs``, and the rebuilt model must have the recorded structure hash. ``python``: recorded from
    Python with no spec (the pytest plugin); checkable with ``--model``, the factory called without arguments.
    """
    if spec is None:
        inferred = builder_of(model)
        kind, stored = ("builder", inferred) if inferred else ("python", None)
        spec_from = "config" if inferred else None
    else:
        kind, stored = stored_model_spec(spec)
        spec_from = "given"
    config = getattr(model, "config", None)
    if kind == "python":
        factory_kwargs = None
    elif factory_kwargs is None and kind == "builder" and isinstance(config, dict) and "num_classes" in config:
        factory_kwargs = {"num_classes": int(config["num_classes"])}
    elif factory_kwargs is None:
        factory_kwargs = {}  # a Python caller that named a factory but not its arguments: called without any
    return {"kind": kind, "spec": stored, "spec_from": spec_from,
            "factory_kwargs": None if factory_kwargs is None else dict(factory_kwargs), **model_identity(model)}


def generate_batch(batch: int, seed: int, input_shape: tuple[int, ...],
                   num_classes: int) -> tuple[Tensor, Tensor, dict]:
    """Inputs and labels from one seeded generator, and the sentence saying how (stored in meta.json)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *input_shape, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    how = {
        "seed": seed,
        "inputs": f"torch.randn({batch}, {', '.join(map(str, input_shape))}, generator=g) with "
                  f"g = torch.Generator().manual_seed({seed})",
        "targets": f"torch.randint(0, {num_classes}, ({batch},), generator=g), drawn after the inputs",
    }
    return x, y, how


def checkpoint_plan(trace: Trace) -> dict[str, list[str]]:
    """Unit -> quantities stored under the ``checkpoints`` policy (see the module docstring)."""
    def ident(t: Tensor) -> tuple:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))

    producer = {}
    for rec in trace:
        for t in rec.outputs:
            producer.setdefault(ident(t), rec.name)
    keep = {rec.name: list(DICT_QUANTITIES) for rec in trace}
    feeders = set()
    for rec in trace:
        if sum(t is not None for t in rec.inputs) >= 2:
            feeders |= {producer[ident(t)] for t in rec.inputs if t is not None and ident(t) in producer}
    if trace.units:
        feeders.add(trace.forward_order[-1])
    for name in feeders:
        keep[name] += ["outputs", "grad_outputs"]
    return keep


def distinct_bytes(trace: Trace) -> int:
    """An upper bound of the bytes a ``full`` fixture of ``trace`` holds (distinct storages)."""
    seen: dict[int, int] = {}
    for rec in trace:
        tensors = [t for q in ("inputs", "outputs", "grad_outputs", "grad_inputs") for t in getattr(rec, q)]
        tensors += [t for q in DICT_QUANTITIES for t in getattr(rec, q).values()]
        for t in tensors:
            if t is not None:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def capture_bytes(captured: Capture) -> int:
    """An upper bound of the bytes an op capture's values take in a fixture (distinct storages)."""
    seen: dict[int, int] = {}
    for rec in captured:
        for t in (rec.input_values or []) + (rec.output_values or []):
            if isinstance(t, Tensor):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def one_thread_oracle(model: nn.Module, inputs: Tensor, targets: Tensor, steps: int = 1, eval_mode: bool = False,
                      units: list[str] | None = None, keep_graph: bool = True) -> list[Trace]:
    """:func:`densenet_debug.verdict.engine.oracle_traces` (the float64 CPU oracle, ``model`` untouched) run
    with one thread, so that a recorded or reproduced fixture does not depend on the machine's thread count.

    ``units``: the unit names, when known (a fixture's), which spares the discovery pass; ``keep_graph``
    keeps each step's autograd graph for the judge's kink explanations (not needed to record).
    """
    from densenet_debug.verdict.engine import oracle_traces as oracle

    with one_thread():
        return oracle(model, inputs, targets, steps=steps, eval_mode=eval_mode, units=units, keep_graph=keep_graph)


def cross_check(model: nn.Module, inputs: Tensor, targets: Tensor, steps: int, eval_mode: bool) -> dict:
    """PyTorch float64 vs the independent NumPy oracle (our DenseNets), unit by unit; raise if they disagree."""
    try:
        from densenet_debug.numpy_oracle import compare_with_torch
    except ImportError:
        return {"status": "unavailable", "why": "densenet_debug.numpy_oracle is not installed in this toolkit version"}
    from densenet_debug.models.densenet import DenseNet

    if not isinstance(model, DenseNet):
        return {"status": "not applicable", "why": f"the NumPy oracle runs our DenseNets, not {type(model).__name__}"}
    try:
        with one_thread():
            report = compare_with_torch(copy.deepcopy(model), inputs, targets, train=not eval_mode)
    except UsageError as exc:
        return {"status": "not applicable", "why": str(exc)}
    ratios = [r.ratio for r in report.rows if r.ratio == r.ratio]
    summary = {
        "status": report.verdict,
        "oracle": "densenet_debug.numpy_oracle: NumPy float64 forward and backward, no torch in its math; every unit "
                  "fed the inputs and grad_outputs PyTorch float64 saw, judged against its derived rounding bound",
        "rows": len(report.rows),
        "worst_error_over_tolerance": max(ratios, default=0.0),
        "first_divergence": report.first_divergence,
        "step": "the first" if steps > 1 else "the only",
    }
    if report.verdict != "agree":
        raise OracleDisagreement(f"PyTorch float64 disagrees with the NumPy oracle at {report.first_divergence}")
    return summary


def provenance(device: str = "cpu") -> dict:
    """Versions, device, flags in force, toolkit commit, date (``SOURCE_DATE_EPOCH`` when set)."""
    from densenet_debug.backends import environment

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc) if epoch else dt.datetime.now(dt.timezone.utc)
    env = environment()
    env["threads"] = 1
    return {
        "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "toolkit": __version__, "git_commit": _git_commit(), "device": device,
        "environment": env,
        "flags": {"mkldnn.enabled": torch.backends.mkldnn.enabled, "deterministic_algorithms":
                  torch.are_deterministic_algorithms_enabled(), "default_dtype": str(torch.get_default_dtype())},
        "date": when.replace(microsecond=0).isoformat(),
    }


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def record_reference(
    model: nn.Module, inputs: Tensor, targets: Tensor, path: str | Path, *, name: str | None = None,
    spec: str | None = None, factory_kwargs: dict | None = None, data: dict | None = None, steps: int = 1,
    eval_mode: bool = False, policy: str = "auto", max_mb: float = DEFAULT_MAX_MB, check_oracle: bool = True,
    ops: bool = False,
) -> Path:
    """Record the float64 truth of ``steps`` training steps of ``model`` on ``(inputs, targets)`` at ``path``.

    ``spec``: how ``model`` was made (a builder name, ``file.py:factory`` or ``package.module:factory``;
    inferred for our builders) and ``factory_kwargs`` the keywords it was called with (``{}`` or
    ``{"num_classes": n}``), stored so that ``check-reference`` rebuilds it the same way (see
    :func:`model_description`); ``data``: how the inputs were generated. The weights are stored too, so the
    fixture rebuilds the exact model. Raises :class:`OracleDisagreement` if the NumPy cross-check fails.
    ``ops``: also store the float64 oracle's op capture of the first step (schema 4; every aten op forward and
    backward with its layouts, arguments and float64 values, see :mod:`densenet_debug.reference.format`), so that
    ``check_reference(..., ops=True)`` judges a backend op by op against it. It is stored whole, so it must fit
    in ``max_mb`` itself (else :class:`UsageError`: no storage policy shrinks it).
    """
    if policy not in POLICIES:
        raise UsageError(f"unknown storage policy {policy!r}; choose from {', '.join(POLICIES)}")
    if steps < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")
    model = copy.deepcopy(model).cpu()
    inputs, targets = inputs.detach().cpu(), targets.detach().cpu()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    traces = one_thread_oracle(model, inputs, targets, steps=steps, eval_mode=eval_mode, keep_graph=False)
    captured = op_capture(model, inputs, targets, eval_mode) if ops else None
    if captured is not None and (held := capture_bytes(captured)) > max_mb * 1e6:
        # the op capture is stored whole (every op's float64 inputs and outputs): no policy can shrink it
        raise UsageError(f"the op capture holds {held / 1e6:.0f} MB of float64 values, over --max-mb {max_mb:g}: "
                         f"record --ops at a smaller batch, or raise --max-mb")
    checked = cross_check(model, inputs, targets, steps, eval_mode) if check_oracle else {"status": "skipped"}
    full_bytes = max(distinct_bytes(t) for t in traces)
    chosen = policy if policy != "auto" else ("full" if full_bytes <= max_mb * 1e6 else "checkpoints")
    keep = None
    if chosen == "checkpoints":
        plans = [checkpoint_plan(t) for t in traces]
        keep = {u: sorted({q for p in plans for q in p.get(u, ())}) for p in plans for u in p}
    storage = {
        "policy": chosen,
        "quantities": list(ALL_QUANTITIES),
        "checkpoint_units": None if keep is None else sorted(u for u, q in keep.items() if "outputs" in q),
        "recomputed": None if keep is None else (
            "quantities not stored are recomputed in float64 on the CPU (one thread) from the stored inputs and "
            "weights at check time, and that recomputation is verified against every stored tensor first"),
        "dedup": "each distinct tensor once; concatenations and their input gradients as verified recipes",
        "full_bytes_upper_bound": full_bytes,
    }
    meta = {
        "name": name or Path(path).name,
        "model": {**model_description(model, spec, factory_kwargs),
                  "num_classes": int(traces[0].output.shape[-1]) if traces[0].output is not None else None},
        "data": {"batch": int(inputs.shape[0]), "input_shape": list(inputs.shape[1:]),
                 "input_dtype": str(inputs.dtype).removeprefix("torch."),
                 "generation": data or {"how": "supplied by the caller; stored in inputs.npz"}},
        "step": {"steps": steps, "bn_mode": "eval" if eval_mode else "train", "loss": LOSS,
                 "between_steps": "verdict.oracle_traces's update (see densenet_debug.verdict.engine)"},
        "dtype": "float64",
        "units": len(traces[0]),
        "truth": {"computed_by": "PyTorch float64 on the CPU, one thread "
                                 "(densenet_debug.verdict.engine.oracle_traces): "
                                 "the same model, weights, inputs, labels and BN state as every side",
                  "cross_check": checked},
        "storage": storage,
        "provenance": provenance(),
    }
    calls = [[c.label for c in calls_of(t)] for t in traces]
    if any(calls):  # (a model that applies none: no section, schema 2, the same bytes as before schema 3)
        meta["functions"] = function_section(calls, stored=keep is None)
    if captured is not None:  # (not asked: no section, the same bytes as before schema 4)
        meta["ops"] = ops_section(captured)
    return write_fixture(path, meta, inputs, targets, state, traces, keep, ops=captured)


def op_capture(model: nn.Module, inputs: Tensor, targets: Tensor, eval_mode: bool) -> Capture:
    """The float64 oracle's op capture of the first step, as the op judge makes it live
    (:func:`densenet_debug.verdict.ops.oracle_capture`: a float64 CPU copy, one thread, cross-entropy)."""
    from densenet_debug.verdict.ops import oracle_capture

    return oracle_capture(model, inputs, targets, eval_mode=eval_mode)


def ops_section(captured: Capture) -> dict:
    """meta.json's ``ops``: what the op capture holds."""
    return {
        "step": 0, "records": len(captured), "phases": captured.counts(),
        "what": ("the float64 oracle's op capture of the first step (densenet_debug.verdict.ops.oracle_capture): "
                 "every aten op forward and backward with its key, module, layouts, typed non-tensor arguments and "
                 "float64 input and output values (index.json ops, trace.npz); node numbers as ranks within the "
                 "capture. check-reference --ops teacher-forces every op of a backend on these values"),
    }


def function_section(calls: list[list[str]], stored: bool) -> dict:
    """meta.json's ``functions``: the custom autograd Function calls of each step, and what was kept of them."""
    return {
        "calls": calls,
        "stored": stored,
        "what": ("every call's float64 inputs, outputs, grad_outputs and grad_inputs, with its input and "
                 "grad_output layouts, in trace.npz (index.json steps[i].functions); named by module path, class "
                 "and occurrence; the class, its code and its non-tensor arguments are not stored: the check "
                 "binds the model's own Function by that name and judges each call as a teacher-forced unit "
                 "(mode function)") if stored else (
                 "not stored (policy checkpoints): recomputed in float64 with the rest of the step at check time "
                 "and judged against that recomputation; the stored checkpoints are what it must reproduce"),
    }
