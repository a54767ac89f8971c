"""Loading a user's model as a user meets it: files, siblings, ``module:factory``, factories with or without
``num_classes``, squeezed log-probability outputs — through the real console script, in a subprocess (error
paths whose exit code another test already checks through a real process run in-process, through main()).

The user models live in ``tests/models/user_models/`` (not collected: no ``test_`` prefix), each written in
a style users write: the 2017 seed's functional DenseNet (camelCase constructor, ``torch.squeeze``,
``log_softmax``, no ``num_classes``), a model file importing a module beside it, and a squeezed classifier.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from densenet_debug.cli import main
from densenet_debug.errors import UsageError
from densenet_debug.models import load_checked_model, resolve_model, takes_num_classes
from densenet_debug.models.batch import make_batch

USER = Path(__file__).parent / "user_models"
CLI = Path(sys.executable).with_name("densenet-debug")


def cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed console script (its sys.path[0] is its bin directory, not ``cwd``), one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
    return subprocess.run([str(CLI), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], err[-2000:])
    assert "Traceback" not in result.stdout + result.stderr and "\n" not in err, err
    return err


# -- every loading path and every verb -------------------------------------------------------------
# (spec, cwd): an absolute file path from elsewhere; a relative file path; module:factory from its directory.
LOADING_PATHS = {
    "seed-style file, no num_classes, squeezed log_softmax": (f"{USER / 'seed_style.py'}:small", None),
    "file importing a sibling module, relative path": ("user_models/sibling_model.py:build", USER.parent),
    "module:factory from the current directory": ("seed_style:small_classes", USER),
    "squeezed classifier file": (f"{USER / 'squeezed.py'}:squeezed", None),
}


# Every path through diff (the main verb), and every verb through the hardest path: the loading is one function
# (load_checked_model), so the other path x verb cells added subprocess time and no new property.
HARDEST = "seed-style file, no num_classes, squeezed log_softmax"
CELLS = [(path, "diff") for path in LOADING_PATHS] + [(HARDEST, verb) for verb in ("info", "gradcheck", "oracle")]


@pytest.mark.parametrize(("path", "verb"), CELLS)
def test_every_loading_path_through_the_cli(verb: str, path: str, tmp_path: Path) -> None:
    spec, cwd = LOADING_PATHS[path]
    argv = {"info": ["--batch", "4"], "diff": ["--batch", "2", "--threads", "1"], "gradcheck": [],
            "oracle": []}[verb]
    result = cli(verb, "--model", spec, *argv, cwd=cwd or tmp_path)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    if verb == "oracle" and result.returncode == 2:
        # The NumPy oracle knows the DenseNet family only (for now): a one-line refusal *after* loading.
        assert "NumPy oracle" in one_line_error(result)
        return
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    expected = {"info": "parameters:", "diff": "agree", "gradcheck": "pass", "oracle": "agree"}[verb]
    assert expected in result.stdout


def test_module_spec_from_cwd_is_not_found_elsewhere(tmp_path: Path) -> None:
    err = one_line_error(cli("info", "--model", "seed_style:small", cwd=tmp_path))
    assert "cannot import module 'seed_style'" in err


# A real process for the verbs whose exit 2 and one-line error no other test runs through one (gradcheck,
# graph); diff and record, whose are (tests/cli/test_robust.py), run in-process through main().
@pytest.mark.parametrize(("verb", "process"), [("diff", False), ("gradcheck", True), ("graph", True),
                                               ("record", False)])
def test_batch_of_one_with_a_squeezed_output_is_one_line(verb: str, process: bool, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    out = {"graph": ["--out", str(tmp_path / "g.dot")], "record": ["--name", "x", "--out-dir", str(tmp_path)]}
    argv = [verb, "--model", "squeezed.py:squeezed", "--batch", "1", *out.get(verb, [])]
    if process:
        err = one_line_error(cli(*argv, cwd=USER))
    else:
        monkeypatch.chdir(USER)
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and "\n" not in err, err
    assert "for a batch of 1" in err and "--batch 2" in err
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_num_classes_checks_a_factory_that_has_no_such_parameter(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """In-process: info's exit 2 through a real process is test_module_spec_from_cwd_is_not_found_elsewhere's."""
    monkeypatch.chdir(USER)
    assert main(["info", "--model", "sibling_model.py:fixed", "--num-classes", "7"]) == 0
    capsys.readouterr()
    assert main(["info", "--model", "sibling_model.py:fixed", "--num-classes", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert "returns 7 classes, not --num-classes 10" in err and "\n" not in err


# -- the library under the CLI --------------------------------------------------------------------------
def test_takes_num_classes_reads_the_signature() -> None:
    def with_it(num_classes: int = 10) -> None: ...
    def keyword_only(*, num_classes: int) -> None: ...
    def kwargs(**kw: object) -> None: ...
    def without() -> None: ...
    def camel(nClasses: int = 10) -> None: ...  # noqa: N803 - the seed's spelling
    assert takes_num_classes(with_it) and takes_num_classes(keyword_only) and takes_num_classes(kwargs)
    assert not takes_num_classes(without) and not takes_num_classes(camel)
    assert takes_num_classes(torch.nn.Linear) is False  # a class: its constructor's signature


def test_a_file_model_imports_its_sibling_and_keeps_sys_path_as_python_would() -> None:
    model = resolve_model(f"{USER / 'sibling_model.py'}:fixed", num_classes=7)  # no num_classes: called bare
    assert type(model).__name__ == "TwoLayerNet" and str(USER) in sys.path


def test_load_checked_model_refuses_a_width_other_than_num_classes() -> None:
    with pytest.raises(UsageError, match="returns 10 classes, not --num-classes 3"):
        load_checked_model(f"{USER / 'seed_style.py'}:small", (3, 32, 32), num_classes=3)
    model = load_checked_model(f"{USER / 'seed_style.py'}:small_classes", (3, 32, 32), num_classes=3)
    assert model.fc.out_features == 3


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(2, 6), seed=st.integers(0, 2**31 - 1))
def test_make_batch_counts_classes_on_a_squeezed_model(batch: int, seed: int) -> None:
    model = resolve_model(f"{USER / 'squeezed.py'}:squeezed", num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = make_batch(model, (3, 4, 4), batch, seed)
    assert x.shape == (batch, 3, 4, 4) and y.shape == (batch,) and int(y.min()) >= 0 and int(y.max()) < 5
    again = make_batch(model, (3, 4, 4), batch, seed)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # The labels are the same stream as with --num-classes given: the probe draws nothing from the generator.
    assert torch.equal(make_batch(model, (3, 4, 4), batch, seed, num_classes=5)[1], y)


def test_the_seed_bc100_gets_its_class_count_where_diff_crashed() -> None:
    """``diff --model seed.py:bc100`` died in the class-count probe (IndexError after torch.squeeze at batch 1)."""
    model = load_checked_model(f"{USER / 'seed_style.py'}:bc100", (3, 32, 32))
    assert sum(p.numel() for p in model.parameters()) == 769_162  # the seed's BC-100, as the paper counts it
    x, y = make_batch(model, (3, 32, 32), 8, 0)
    assert x.shape == (8, 3, 32, 32) and int(y.max()) < 10
    assert torch.equal(y, make_batch(model, (3, 32, 32), 8, 0, num_classes=10)[1])


def test_make_batch_at_batch_one_names_the_squeeze() -> None:
    model = resolve_model(f"{USER / 'squeezed.py'}:squeezed")
    with pytest.raises(UsageError, match=r"returns shape \(10,\) for a batch of 1, not \(1, 10\)"):
        make_batch(model, (3, 8, 8), 1, 0)
    with pytest.raises(UsageError, match="for a batch of 1"):
        make_batch(model, (3, 8, 8), 1, 0, num_classes=10)
    plain = resolve_model("densenet-bc-10")
    x, y = make_batch(plain, (3, 32, 32), 1, 0)
    assert x.shape == (1, 3, 32, 32) and y.shape == (1,)
