"""``meta.json`` of a reference fixture: the schema, every field a reader uses with its type, the checksums.

meta.json is the one file of a fixture not covered by a checksum (it holds them), so it is validated field by
field instead: ``files`` lists exactly the four other files with their size and SHA-256 (checked by
:func:`verify_files`), and the model section names no path and nothing to import — a fixture is data and
never runs code. Every refusal is a :class:`FixtureError`: one line naming the file and the field (exit 2).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from densenet_debug.errors import UsageError

SCHEMA_PREFIX = "densenet-debug/reference/"
# 2: model.kind, factory_kwargs, structure hash of names and types. 3: 2 plus the model's custom autograd Function
# calls (meta.json ``functions``, index.json ``steps[i].functions``). A fixture of a model that applies no custom
# Function is written as 2, byte for byte what this toolkit wrote before 3 (older toolkits still read it); one
# with Function calls as 3, which an older toolkit refuses rather than silently ignoring them. 4: 3 plus the float64
# oracle's op capture of the first step (meta.json ``ops``, index.json ``ops``), written only when asked for
# (``record --ops``); a fixture without it keeps schema 2 or 3, byte for byte, and a toolkit that reads only up to 3
# refuses a 4 in one line ("newer than this toolkit reads").
SCHEMA_VERSION = 4
SCHEMA_OLDEST = 2  # the oldest schema this toolkit reads
SCHEMA = f"{SCHEMA_PREFIX}3"  # with custom Function calls
SCHEMA_OPS = f"{SCHEMA_PREFIX}{SCHEMA_VERSION}"  # with the oracle's op capture
SCHEMA_NO_FUNCTIONS = f"{SCHEMA_PREFIX}{SCHEMA_OLDEST}"
FILE_NAMES = ("index.json", "inputs.npz", "state.npz", "trace.npz")  # every file meta.json checksums
MODEL_KINDS = ("builder", "file", "module", "python")
_SPEC_FORMS = {"builder": "a builder name of densenet_debug.models.BUILDERS", "file": "FILE.py:FACTORY (a file name, "
               "no directory)", "module": "package.module:FACTORY", "python": "null (recorded from Python)"}
_FILE_SPEC = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*:[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_MODULE_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", re.ASCII)
_HEX64 = re.compile(r"[0-9a-f]{64}")
NARROWED_DTYPES = {"bfloat16": torch.bfloat16}  # state_dtypes values a reader accepts


class FixtureError(UsageError):
    """A fixture that cannot be used: one line naming the file and the cause (the CLI exits 2)."""

    def __init__(self, path: str | Path, cause: str) -> None:
        super().__init__(f"{path}: {cause}")
        self.path, self.cause = Path(path), cause


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_meta(path: str | Path) -> dict:
    """``meta.json`` of the fixture at ``path``, with its schema and every field checked (one-line errors)."""
    root = Path(path)
    if not root.exists():
        raise FixtureError(root, "no such fixture directory")
    if not root.is_dir():
        raise FixtureError(root, "not a fixture directory (expected reference_grads/<name>/)")
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise FixtureError(meta_path, "missing; not a reference fixture (or a half-copied one)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FixtureError(meta_path, f"not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise FixtureError(meta_path, "not a JSON object")
    schema = meta.get("schema")
    if not isinstance(schema, str) or not schema.startswith(SCHEMA_PREFIX):
        raise FixtureError(meta_path, f"schema {schema!r} is not a densenet-debug reference schema")
    version = schema.removeprefix(SCHEMA_PREFIX)
    if not version.isdigit():
        raise FixtureError(meta_path, f"unreadable schema version {version!r}")
    if int(version) > SCHEMA_VERSION:
        raise FixtureError(meta_path, f"schema {schema} is newer than this toolkit reads ({SCHEMA_OPS}); "
                                      "upgrade densenet-debug or re-record the fixture")
    if int(version) < SCHEMA_OLDEST:
        raise FixtureError(meta_path, f"schema {schema} is older than {SCHEMA_NO_FUNCTIONS}; re-record it: "
                                      "scripts/regen_reference for the committed fixtures, `densenet-debug record "
                                      "--force` (same options) for your own")
    validate_meta(meta, meta_path)
    if int(version) < 3 and "functions" in meta:
        raise FixtureError(meta_path, f"field functions is not part of schema {schema} (custom Function calls "
                                      f"are recorded from {SCHEMA} on); an edited meta.json")
    if int(version) < 4 and "ops" in meta:
        raise FixtureError(meta_path, f"field ops is not part of schema {schema} (op captures are recorded from "
                                      f"{SCHEMA_OPS} on); an edited meta.json")
    if int(version) == 4 and "ops" not in meta:
        raise FixtureError(meta_path, f"schema {schema} without field ops (the op capture it is written for); an "
                                      "edited meta.json")
    return meta


def schema_for(meta: dict) -> str:
    """The schema a fixture is written with: 4 with an op capture, else 3 when it says anything of custom Function
    calls, else 2."""
    if "ops" in meta:
        return SCHEMA_OPS
    return SCHEMA if "functions" in meta else SCHEMA_NO_FUNCTIONS


def stored_model_spec(spec: str) -> tuple[str, str]:
    """``(kind, spec as stored)`` for a ``--model`` spec: the form that works from any directory.

    A builder name stays (``builder``); ``path/to/m.py:factory`` becomes ``m.py:factory`` (``file``: the
    user names the file again with ``--model``); ``package.module:factory`` stays (``module``).
    """
    from densenet_debug.models import BUILDERS

    if spec in BUILDERS:
        return "builder", spec
    where, _, factory = spec.rpartition(":")
    if where.endswith(".py") or "/" in where or "\\" in where:  # the rule of models.resolve_model
        return "file", f"{Path(where.replace(chr(92), '/')).name}:{factory}"
    return "module", spec


def _spec_fits(kind: str, spec: object) -> bool:
    from densenet_debug.models import BUILDERS

    if kind == "python":
        return spec is None
    if not isinstance(spec, str):
        return False
    if kind == "builder":
        return spec in BUILDERS
    return bool((_FILE_SPEC if kind == "file" else _MODULE_SPEC).fullmatch(spec))


def _is_int(value: object, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_hex64(value: object) -> bool:
    return isinstance(value, str) and bool(_HEX64.fullmatch(value))


def shown(value: object, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_meta(meta: dict, where: Path) -> None:
    """Raise :class:`FixtureError` naming the first field of ``meta`` that is missing or ill-typed."""
    def get(dotted: str, ok: Callable[[object], bool], expected: str) -> object:
        node: object = meta
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise FixtureError(where, f"field {dotted} is missing; re-record the fixture "
                                          "(scripts/regen_reference, or densenet-debug record --force)")
            node = node[part]
        if not ok(node):
            raise FixtureError(where, f"field {dotted} must be {expected}, got {shown(node)}")
        return node

    is_dict = lambda v: isinstance(v, dict)  # noqa: E731
    get("name", lambda v: isinstance(v, str) and bool(v), "a non-empty string")
    for section in ("model", "data", "step", "storage", "files", "state_dtypes"):
        get(section, is_dict, "an object")
    kind = get("model.kind", lambda v: v in MODEL_KINDS, f"one of {', '.join(MODEL_KINDS)}")
    spec = get("model.spec", lambda v: v is None or isinstance(v, str), "a string or null")
    if not _spec_fits(str(kind), spec):
        raise FixtureError(where, f"field model.spec must be {_SPEC_FORMS[str(kind)]} for model.kind {kind}, got "
                                  f"{shown(spec)}; a fixture names no paths and runs no code")
    get("model.factory_kwargs", lambda v: v is None or (isinstance(v, dict) and set(v) <= {"num_classes"}
                                                       and all(_is_int(n, 1) for n in v.values())),
        "null or an object with at most num_classes (a positive integer)")
    if kind != "python" and meta["model"]["factory_kwargs"] is None:
        raise FixtureError(where, f"field model.factory_kwargs must say how the {kind} was called, got null")
    get("model.structure_sha256", _is_hex64, "a SHA-256 (64 hex digits)")
    get("model.class", lambda v: isinstance(v, str), "a string")
    get("model.config", lambda v: v is None or is_dict(v), "an object or null")
    get("model.num_classes", lambda v: v is None or _is_int(v, 1), "a positive integer or null")
    get("data.batch", lambda v: _is_int(v, 1), "a positive integer")
    get("data.input_shape", lambda v: isinstance(v, list) and all(_is_int(n, 1) for n in v),
        "a list of positive integers")
    if "input_dtype" in meta["data"]:
        get("data.input_dtype", lambda v: isinstance(v, str), "a dtype name")
    get("step.steps", lambda v: _is_int(v, 1), "a positive integer")
    get("step.bn_mode", lambda v: v in ("train", "eval"), "train or eval")
    get("storage.policy", lambda v: v in ("full", "checkpoints"), "full or checkpoints")
    get("state_dtypes", lambda v: all(isinstance(k, str) and d in NARROWED_DTYPES for k, d in v.items()),  # type: ignore
        f"an object mapping state names to {', '.join(NARROWED_DTYPES)}")
    if "functions" in meta:
        get("functions", is_dict, "an object")
        get("functions.calls", lambda v: isinstance(v, list) and all(
            isinstance(step, list) and all(isinstance(c, str) for c in step) for step in v),
            "a list (per step) of lists of Function call labels")
        if len(meta["functions"]["calls"]) != meta["step"]["steps"]:
            raise FixtureError(where, f"field functions.calls must list {meta['step']['steps']} step(s), got "
                                      f"{len(meta['functions']['calls'])}")
        get("functions.stored", lambda v: isinstance(v, bool), "true or false")
    if "ops" in meta:
        get("ops", is_dict, "an object")
        get("ops.step", lambda v: v == 0, "0 (the op capture is of the first step)")
        get("ops.records", lambda v: _is_int(v), "a non-negative integer")
        get("ops.phases", lambda v: is_dict(v) and all(_is_int(n) for n in v.values()),  # type: ignore[union-attr]
            "an object mapping phases to op counts")
    files = meta["files"]
    if set(files) != set(FILE_NAMES):
        extra, missing = sorted(set(files) - set(FILE_NAMES)), sorted(set(FILE_NAMES) - set(files))
        cause = f"names {shown(extra[0])}, not a file of a fixture" if extra else f"lacks {', '.join(missing)}"
        raise FixtureError(where, f"field files must list exactly {', '.join(FILE_NAMES)}; it {cause}")
    for name in FILE_NAMES:
        info = files[name]
        if not (is_dict(info) and _is_int(info.get("bytes")) and _is_hex64(info.get("sha256"))):
            raise FixtureError(where, f"field files[{name!r}] must be an object with bytes (an integer) and "
                                      f"sha256 (64 hex digits), got {shown(info)}")


def verify_files(path: str | Path, meta: dict) -> None:
    """Every file named in ``meta['files']`` (see :func:`validate_meta`) has the recorded size and SHA-256."""
    root = Path(path)
    for name in FILE_NAMES:
        info, file = meta["files"][name], root / name
        if not file.is_file():
            raise FixtureError(file, "missing")
        size = file.stat().st_size
        if size != info["bytes"]:
            cause = "truncated" if size < info["bytes"] else "wrong size"
            raise FixtureError(file, f"{cause}: {size} bytes, meta.json records {info['bytes']}")
        digest = sha256(file)
        if digest != info["sha256"]:
            raise FixtureError(file, f"SHA-256 mismatch (corrupted or edited): {digest[:16]}..., "
                                     f"meta.json records {info['sha256'][:16]}...")
