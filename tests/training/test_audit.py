"""Gradient audit during training: a float32 backward that breaks mid-run is caught and named; a clean run
passes; groups, sampling and the default backend."""

from __future__ import annotations

import csv
import textwrap

import torch

from densenet_debug import build_model
from densenet_debug.cli import main
from densenet_debug.training.audit import GradientAudit, default_backend, layer_group, leaf_names
from tests.reference.test_reference_ops import MODELS as NUDGED_MODEL

# A conv whose float32 backward goes wrong after `AFTER` training forwards (a kernel that regresses mid-run,
# e.g. once a cache or an algorithm choice changes). float64 (the oracle) is never affected, as with a real
# fp32-kernel bug. grad_input of channel 0 is scaled by 1.5; forward and grad_weight stay right.
FAULTY_MODEL = '''
import torch
from torch import nn
from densenet_debug import build_model


class _WrongInputGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, conv):
        ctx.save_for_backward(x, weight)
        ctx.conv = conv
        return conv._conv_forward(x, weight, None)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        c = ctx.conv
        gi = torch.nn.grad.conv2d_input(x.shape, w, g, c.stride, c.padding, c.dilation, c.groups)
        gw = torch.nn.grad.conv2d_weight(x, w.shape, g, c.stride, c.padding, c.dilation, c.groups)
        gi[:, 0] *= 1.5
        return gi, gw, None


class BreaksAfter(nn.Conv2d):
    AFTER = 5

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            self.calls = getattr(self, "calls", 0) + 1
        if x.dtype == torch.float32 and getattr(self, "calls", 0) > self.AFTER:
            return _WrongInputGrad.apply(x, self.weight, self)
        return super().forward(x)


class NeverBreaks(BreaksAfter):
    AFTER = 10**9


def _make(cls, num_classes):
    model = build_model("densenet-bc-10", num_classes=num_classes or 10)
    model.block2.layer01.conv2.__class__ = cls
    return model


def faulty(num_classes=None):
    return _make(BreaksAfter, num_classes)


def clean(num_classes=None):
    return _make(NeverBreaks, num_classes)
'''

ARGS = ["--synthetic", "--input-shape", "3,8,8", "--synthetic-size", "40", "--batch-size", "4", "--epochs", "1",
        "--no-plot", "--quiet", "--audit-every", "2"]


def _audit_rows(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_backward_that_breaks_mid_training_stops_the_run_at_the_next_audit(tmp_path, capsys):
    (tmp_path / "models.py").write_text(textwrap.dedent(FAULTY_MODEL))
    save = tmp_path / "run"
    code = main(["train", "--model", f"{tmp_path / 'models.py'}:faulty", *ARGS, "--limit-batches", "8",
                 "--save", str(save)])
    err = capsys.readouterr().err
    assert code == 1
    assert "gradient audit failed: step 6 (epoch 1): block2.layer01.conv2 backward grad_input" in err
    assert err.count("\n") == 1
    rows = _audit_rows(save / "audit.csv")
    assert sorted({r["step"] for r in rows}) == ["2", "4", "6"]
    before = [r for r in rows if r["step"] != "6"]
    assert before and all(r["status"] != "mismatch" for r in before)  # steps 2 and 4: nothing wrong yet
    bad = [r for r in rows if r["status"] == "mismatch"]
    assert [(r["step"], r["group"], r["layer"]) for r in bad] == [("6", "block2", "block2.layer01.conv2")]
    assert float(bad[0]["error"]) > float(bad[0]["tolerance"])
    with open(save / "train.csv") as f:
        assert len(list(csv.DictReader(f))) == 5  # stopped before training on the audited batch


def test_a_correct_backend_passes_every_audit(tmp_path):
    (tmp_path / "models.py").write_text(textwrap.dedent(FAULTY_MODEL))
    save = tmp_path / "run"
    assert main(["train", "--model", f"{tmp_path / 'models.py'}:clean", *ARGS, "--limit-batches", "4",
                 "--save", str(save)]) == 0
    rows = _audit_rows(save / "audit.csv")
    groups = {"stem", "block1", "trans1", "block2", "trans2", "block3", "head"}
    for step in ("2", "4"):
        assert {r["group"] for r in rows if r["step"] == step} == groups  # worst row of every group
    assert all(r["status"] in ("ok", "kink") and r["backend"] == default_backend(torch.device("cpu"))
               for r in rows)


def test_groups_sampling_and_default_backend():
    assert layer_group("block2.layer07.conv2") == "block2" and layer_group("stem") == "stem"
    cpu = torch.device("cpu")
    assert default_backend(cpu, amp=True, channels_last=True).endswith("+channels_last+bf16")
    assert default_backend(torch.device("cuda"), amp=True) == "cudnn+fp16"
    model = build_model("densenet-bc-16")
    names = leaf_names(model)
    audit = GradientAudit(10, "mkldnn", cpu, layers=5, seed=3)
    picks = [audit.units(model, step) for step in (10, 20, 10)]
    assert picks[0] == picks[2] and picks[0] != picks[1]  # seeded by step
    assert all(len(p) == len(set(p)) == 5 and p == sorted(p, key=names.index) for p in picks)
    assert GradientAudit(10, "mkldnn", cpu).units(model, 10) is None  # all layers
    assert audit.due(20) and not audit.due(21)


# The user's model of the op-fixture tests: a conv that, under oneDNN in float32 only, multiplies its output by
# 1 + 2**-22 (``nudged``), an op neither the oracle nor another backend runs, changing values by far less than
# the conv's own tolerance. Every layer's teacher-forced check passes; only the op engine sees it.


def test_audit_ops_stops_on_an_op_only_the_trained_backend_runs(tmp_path, capsys):
    (tmp_path / "nudged.py").write_text(textwrap.dedent(NUDGED_MODEL))
    run = ["train", "--model", f"{tmp_path / 'nudged.py'}:nudged", *ARGS, "--limit-batches", "2",
           "--audit-backend", "mkldnn"]
    assert main([*run, "--save", str(tmp_path / "units")]) == 0  # every layer's own check passes
    assert all(r["status"] in ("ok", "kink") for r in _audit_rows(tmp_path / "units" / "audit.csv"))

    code = main([*run, "--audit-ops", "--save", str(tmp_path / "ops")])
    err = capsys.readouterr().err
    assert code == 1
    assert "gradient audit failed: step 2 (epoch 1): conv1 · aten.mul.Tensor (this side only) forward output" in err
    rows = _audit_rows(tmp_path / "ops" / "audit.csv")
    bad = [r for r in rows if r["status"] == "mismatch"]
    assert [(r["group"], r["layer"]) for r in bad] == [("conv1 ops", "conv1 · aten.mul.Tensor (this side only)")]
    assert {r["group"] for r in rows} >= {"stem", "conv1", "stem ops"}  # units and ops, worst row per group
