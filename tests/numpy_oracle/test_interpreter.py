"""The NumPy op-level interpreter on models written the way users write them, a planted wrong backward, an
op without a rule, and the VJP rules against PyTorch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from densenet_debug import build_model
from densenet_debug.numpy_oracle import OracleReport, UnsupportedOp, compare_ops, compare_with_torch
from densenet_debug.numpy_oracle.vjp import RULES, gamma


# -- models in each user style (written here; no code from elsewhere) ---------------------------------------
class SeedLayer(nn.Module):
    """Research-code style: F.relu inside forward and torch.cat((x, out), 1) in the same forward."""

    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, 2 * k, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(2 * k), nn.Conv2d(2 * k, k, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat((x, out), 1)


class SeedNet(nn.Module):
    """Squeezed pooled features and log-probabilities out, a transition with avg_pool2d."""

    def __init__(self, k: int = 3, n: int = 2, classes: int = 5) -> None:
        super().__init__()
        c = 2 * k
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.dense = nn.Sequential(*[SeedLayer(c + i * k, k) for i in range(n)])
        c += n * k
        self.bn, self.trans = nn.BatchNorm2d(c), nn.Conv2d(c, c // 2, 1, bias=False)
        self.fc = nn.Linear(c // 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.avg_pool2d(self.trans(F.relu(self.bn(self.dense(self.conv1(x))))), 2)
        out = torch.squeeze(F.avg_pool2d(out, out.shape[-1]))
        return F.log_softmax(self.fc(out), dim=1)


class TorchvisionLayer(nn.Module):
    """nn.ReLU(inplace=True), a list concatenated inside, a checkpointed bottleneck."""

    def __init__(self, c: int, k: int, efficient: bool) -> None:
        super().__init__()
        self.norm1, self.relu1, self.conv1 = nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, 2 * k, 1,
                                                                                                  bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(2 * k), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * k, k, 3, padding=1, bias=False)
        self.efficient = efficient

    def _bottleneck(self, *prev: torch.Tensor) -> torch.Tensor:
        return self.conv1(self.relu1(self.norm1(torch.cat(prev, 1))))

    def forward(self, *prev: torch.Tensor) -> torch.Tensor:
        if self.efficient and any(t.requires_grad for t in prev):
            out = cp.checkpoint(self._bottleneck, *prev, use_reentrant=False)
        else:
            out = self._bottleneck(*prev)
        return self.conv2(self.relu2(self.norm2(out)))


class TorchvisionNet(nn.Module):
    def __init__(self, k: int = 3, n: int = 2, classes: int = 5, efficient: bool = True) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 2 * k, 3, padding=1, bias=False)
        self.layers = nn.ModuleList(TorchvisionLayer(2 * k + i * k, k, efficient) for i in range(n))
        c = 2 * k + n * k
        self.norm, self.classifier = nn.BatchNorm2d(c), nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.conv0(x)]
        for layer in self.layers:
            features.append(layer(*features))
        out = F.relu(self.norm(torch.cat(features, 1)), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class TwiceNet(nn.Module):
    """One conv called twice, a Python branch on a shape, max-pooling, a residual sum and a scaled term."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.stem(x)))
        h = h + 0.5 * self.shared(F.relu(self.shared(h)))
        if h.shape[-1] > 4:
            h = F.max_pool2d(h, 2)
        return self.fc(h.reshape(h.shape[0], -1) / 2.0 - 0.1)


def _batch(n: int = 2, hw: int = 8, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, hw, hw, generator=g), torch.randint(0, classes, (n,), generator=g)


def _model(cls: type, seed: int = 0, **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kw)


def _agrees(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool = True) -> OracleReport:
    report = compare_ops(model, x, y, train=train)
    bad = [r for r in report.rows if r.status != "ok"]
    assert report.verdict == "agree" and not bad, bad[:5]
    grads = {(r.layer, r.quantity) for r in report.rows if r.pass_ == "backward"
              and not r.quantity.startswith("grad_output")}
    names = {(n.rsplit(".", 1)[0], "grad_" + n.rsplit(".", 1)[1]) for n, _ in model.named_parameters()}
    assert names | {("(input)", "grad_input")} == grads  # every parameter gradient and the input's
    outputs = {r.layer for r in report.rows if r.quantity.startswith("grad_output")}
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if not report.propagated["notes"]:  # (a reentrant checkpoint's function has no eager output gradients)
        assert convs <= outputs  # module outputs' gradients too
    # the bounds are derived from float64 rounding, not a loose rtol
    assert all(0 <= r.tolerance < 1e-10 for r in report.rows)
    assert any(r.op == "aten.convolution" for r in report.rows) or not any(isinstance(m, nn.Conv2d)
                                                                         for m in model.modules())
    return report


# -- agreement in every style -----------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False])
def test_functional_seed_style_agrees(train: bool) -> None:
    _agrees(_model(SeedNet), *_batch(), train=train)


def test_torchvision_style_with_checkpoint_and_inplace_relu_agrees() -> None:
    report = _agrees(_model(TorchvisionNet), *_batch())
    assert report.environment["engine"] == "op-level interpreter"
    assert any(r.layer == "layers.1.norm1" and r.quantity == "running_var" for r in report.rows)


def test_module_called_twice_and_channels_last_input_agree() -> None:
    x, y = _batch()
    _agrees(_model(TwiceNet), x, y)
    _agrees(_model(TorchvisionNet, efficient=False), x.to(memory_format=torch.channels_last), y)


def test_our_densenet_through_the_interpreter_agrees() -> None:
    torch.manual_seed(0)
    model = build_model("densenet-bc-10")
    report = compare_with_torch(model, *_batch(hw=8, classes=10), op_level=True)
    assert report.verdict == "agree", [r for r in report.rows if r.status != "ok"][:3]
    assert report.environment["engine"] == "op-level interpreter"


# -- a wrong hand-written backward, correct forward: a mismatch, named ---------------------------------------
class CatScalingOneChannel(torch.autograd.Function):
    """cat with a right forward and a backward that scales the last channel of the first input's gradient."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.split = a.shape[1]
        return torch.cat((a, b), 1)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        ga, gb = g[:, :ctx.split].clone(), g[:, ctx.split:]
        ga[:, -1] *= 1.5
        return ga, gb


class PlantedLayer(SeedLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return CatScalingOneChannel.apply(x, out)


def test_a_wrong_custom_cat_backward_is_a_mismatch_upstream_of_it() -> None:
    model = _model(SeedNet)
    planted = PlantedLayer(model.dense[1].bn1.num_features, 3)
    planted.load_state_dict(model.dense[1].state_dict())
    model.dense[1] = planted
    report = compare_with_torch(model, *_batch())
    assert report.verdict == "mismatch"
    failing = [r for r in report.rows if r.status != "ok"]
    assert all(r.pass_ == "backward" for r in failing)  # the forward is right
    # the gradients downstream of the planted cat are right; those of everything before it are not
    assert {r.layer for r in failing} >= {"dense.0.conv2", "conv1"}
    assert not any(r.layer.startswith(("dense.1", "bn", "trans", "fc")) for r in failing)
    first = report.first_divergence  # the output whose gradient is wrong, and the code it came back through
    assert (first["layer"], first["pass"], first["quantity"]) == ("dense.0", "backward", "grad_output"), first
    assert "dense.1 · aten.cat" in first["note"]


def test_nonfinite_never_passes() -> None:
    class Blowup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3 * 8 * 8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1)) / 0.0

    report = compare_ops(_model(Blowup), *_batch())
    assert report.verdict == "mismatch"
    assert any(r.status == "nonfinite" for r in report.rows)
    assert report.to_json()["verdict"] == "mismatch"


# -- an op without a rule: one line naming it, exit 2 -------------------------------------------------------
GELU_MODEL = '''
import torch
from torch import nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return F.gelu(self.conv(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = Block()
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.block1(x).mean((2, 3)))


def factory():
    torch.manual_seed(0)
    return Net()
'''


def test_an_op_without_a_rule_is_named_with_its_module(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from densenet_debug.cli import main

    (tmp_path / "gelu_model.py").write_text(GELU_MODEL)
    code = main(["oracle", "--model", f"{tmp_path / 'gelu_model.py'}:factory", "--input-shape", "3,6,6",
                 "--quiet", "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "no NumPy rule for aten.gelu.default (at block1" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1, err


def test_unsupported_op_is_a_usage_error_from_the_api() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.Tanhshrink())
    with pytest.raises(UnsupportedOp, match=r"aten\.\w+.* \(at 3"):
        compare_ops(model, *_batch())


def test_cli_runs_a_user_file_and_exits_0_or_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from densenet_debug.cli import main

    src = Path(__file__).read_text()
    planted = src[src.index("class CatScalingOneChannel"):src.index("def test_a_wrong_custom_cat_backward")]
    (tmp_path / "mine.py").write_text(src.split("# -- agreement")[0].replace("from densenet_debug", "# ") + planted
                                      + "\n\ndef good():\n    torch.manual_seed(0)\n    return SeedNet()\n"
                                      + "\n\ndef bad():\n    model = good()\n"
                                      + "    model.dense[1].__class__ = PlantedLayer\n    return model\n")
    out = tmp_path / "r.json"
    assert main(["oracle", "--model", f"{tmp_path / 'mine.py'}:good", "--input-shape", "3,8,8", "--quiet",
                 "--threads", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["verdict"] == "agree" and data["environment"]["engine"] == "op-level interpreter"
    assert "dense.0" in data["modules"] and any(r["op"] == "aten.cat" for r in data["rows"])
    assert "agree" in capsys.readouterr().out
    assert main(["oracle", "--model", f"{tmp_path / 'mine.py'}:bad", "--input-shape", "3,8,8", "--quiet",
                 "--threads", "1"]) == 1
    assert "first divergence: dense.0 backward grad_output (its gradient comes from dense.1 · aten.cat" in \
        capsys.readouterr().out.replace("\n", " ")


# -- VJP rules against PyTorch's autograd, within their derived bounds -------------------------------------------
def _check_rule(name: str, torch_fn, args: list, grad_slots: list[int], seed: int) -> None:  # noqa: ANN001
    rule = RULES[name]
    ts = [torch.tensor(a, requires_grad=i in grad_slots) if isinstance(a, np.ndarray) else a
          for i, a in enumerate(args)]
    out = torch_fn(*ts)
    out0 = out[0] if isinstance(out, tuple) else out
    ours = rule.forward(args, False)
    ours0 = ours[0] if isinstance(ours, tuple) else ours
    abs_args = [np.asarray(np.abs(a)) if isinstance(a, np.ndarray) else a for a in args]
    if rule.bound_fwd is not None:
        tol = rule.bound_fwd(args, ours)
        tol = tol[0] if isinstance(tol, tuple) else tol
    else:
        a_abs = rule.forward(abs_args, True)
        tol = gamma(rule.k_fwd(args)) * (a_abs[0] if isinstance(a_abs, tuple) else a_abs)
    assert np.all(np.abs(out0.detach().numpy() - ours0) <= 2 * tol), name
    g = np.random.default_rng(seed).standard_normal(out0.shape)
    theirs = torch.autograd.grad(out0, [ts[i] for i in grad_slots], torch.tensor(g))
    gin = rule.backward(args, ours, (g, None) if isinstance(ours, tuple) else g, False)
    gt = (g, None) if isinstance(ours, tuple) else g
    if rule.bound_bwd is not None:
        gabs = rule.bound_bwd(args, ours, gt)
    else:
        gabs = rule.backward(abs_args, ours, (np.abs(g), None) if isinstance(ours, tuple) else np.abs(g), True)
        gabs = {s: gamma(rule.k_bwd(args)) * v for s, v in gabs.items()}
    slot_of = {a: j for j, a in enumerate(i for i, v in enumerate(args) if isinstance(v, np.ndarray))}
    for t, i in zip(theirs, grad_slots):
        s = slot_of[i]
        tol = 0.0 if rule.exact_bwd else 2 * gabs[s]
        assert gin[s].shape == tuple(t.shape), name
        assert np.all(np.abs(t.numpy() - gin[s]) <= tol), (name, i, float(np.abs(t.numpy() - gin[s]).max()))


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 4), o=st.integers(1, 3), hw=st.integers(3, 7), k=st.sampled_from([1, 3]),
       stride=st.integers(1, 2), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_convolution_rule(n: int, c: int, o: int, hw: int, k: int, stride: int, bias: bool, seed: int) -> None:
    r = np.random.default_rng(seed)
    x, w = r.standard_normal((n, c, hw, hw)), r.standard_normal((o, c, k, k))
    b = r.standard_normal(o) if bias else None
    p = k // 2
    args = [x, w, b, [stride, stride], [p, p], [1, 1], False, [0, 0], 1]
    _check_rule("aten.convolution.default", torch.ops.aten.convolution.default, args, [0, 1] + ([2] if bias else []),
                seed)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 3), hw=st.integers(2, 7), k=st.integers(1, 3), stride=st.integers(1, 2),
       pad=st.integers(0, 1), seed=st.integers(0, 2**16))
def test_pooling_rules(n: int, c: int, hw: int, k: int, stride: int, pad: int, seed: int) -> None:
    pad = min(pad, k // 2)
    if hw + 2 * pad < k:
        return
    x = np.random.default_rng(seed).standard_normal((n, c, hw, hw))
    _check_rule("aten.avg_pool2d.default", torch.ops.aten.avg_pool2d.default, [x, [k, k], [stride, stride], [pad, pad]],
                [0], seed)
    _check_rule("aten.max_pool2d_with_indices.default", torch.ops.aten.max_pool2d_with_indices.default,
                [x, [k, k], [stride, stride], [pad, pad]], [0], seed)
    out = max(1, hw // k)
    _check_rule("aten._adaptive_avg_pool2d.default", torch.ops.aten._adaptive_avg_pool2d.default, [x, [out, out]],
                [0], seed)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 4), c=st.integers(1, 5), k=st.integers(1, 6), seed=st.integers(0, 2**16),
       bcast=st.sampled_from(["same", "row", "col", "scalar"]))
def test_matrix_and_broadcasting_rules(n: int, c: int, k: int, seed: int, bcast: str) -> None:
    r = np.random.default_rng(seed)
    a, m1, m2 = r.standard_normal(c), r.standard_normal((n, k)), r.standard_normal((k, c))
    _check_rule("aten.addmm.default", torch.ops.aten.addmm.default, [a, m1, m2], [0, 1, 2], seed)
    x = r.standard_normal((n, c))
    y = {"same": (n, c), "row": (1, c), "col": (n, 1), "scalar": ()}[bcast]
    y = r.uniform(0.5, 2.0, y) * r.choice([-1, 1], y)
    for name, fn in (("aten.mul.Tensor", torch.ops.aten.mul.Tensor), ("aten.div.Tensor", torch.ops.aten.div.Tensor),
                     ("aten.sub.Tensor", torch.ops.aten.sub.Tensor), ("aten.add.Tensor", torch.ops.aten.add.Tensor)):
        _check_rule(name, fn, [x, np.asarray(y)], [0, 1], seed)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(2, 4), c=st.integers(1, 4), hw=st.integers(1, 4), train=st.booleans(), seed=st.integers(0, 2**16))
def test_batch_norm_log_softmax_and_loss_rules(n: int, c: int, hw: int, train: bool, seed: int) -> None:
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, c, hw, hw)) * 3 + 1
    w, b, rm, rv = r.standard_normal(c), r.standard_normal(c), r.standard_normal(c), r.uniform(0.5, 2, c)
    name = "aten.native_batch_norm.default"

    def bn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor, *rest: object):
        return torch.ops.aten.native_batch_norm.default(x, w, b, rm.clone(), rv.clone(), *rest)

    args = [x, w, b, rm, rv, train, 0.1, 1e-5]
    rule = RULES[name]
    ts = [torch.tensor(a, requires_grad=i < 3) if isinstance(a, np.ndarray) else a for i, a in enumerate(args)]
    y = bn(*ts)[0]
    ours = rule.forward(args, False)
    assert np.all(np.abs(y.detach().numpy() - ours[0]) <= 2 * rule.bound_fwd(args, ours)[0])
    g = r.standard_normal(y.shape)
    theirs = torch.autograd.grad(y, ts[:3], torch.tensor(g))
    mine, tol = rule.backward(args, ours, (g, None, None), False), rule.bound_bwd(args, ours, (g, None, None))
    for s in range(3):
        assert np.all(np.abs(theirs[s].numpy() - mine[s]) <= 2 * tol[s]), s
    logits, t = r.standard_normal((n, c + 1)) * 4, r.integers(0, c + 1, n)
    _check_rule("aten._log_softmax.default", torch.ops.aten._log_softmax.default, [logits, 1, False], [0], seed)
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    _check_rule("aten.nll_loss_forward.default", torch.ops.aten.nll_loss_forward.default, [lp, t, None, 1, -100],
                [0], seed)


def test_view_rules_move_gradients_exactly() -> None:
    x = np.arange(24.0).reshape(2, 3, 4)
    for name, fn, args in [
        ("aten.slice.Tensor", torch.ops.aten.slice.Tensor, [x, 2, 1, 3]),
        ("aten.select.int", torch.ops.aten.select.int, [x, 1, 2]),
        ("aten.permute.default", torch.ops.aten.permute.default, [x, [2, 0, 1]]),
        ("aten.expand.default", torch.ops.aten.expand.default, [x[:, :1], [2, 3, 4]]),
        ("aten.squeeze.dims", torch.ops.aten.squeeze.dims, [x[:, :1], [1]]),
        ("aten.unsqueeze.default", torch.ops.aten.unsqueeze.default, [x, -1]),
        ("aten.view.default", torch.ops.aten.view.default, [x, [6, 4]]),
    ]:
        _check_rule(name, fn, args, [0], 0)
    parts = [x[:, :1], x[:, 1:]]
    out = RULES["aten.cat.default"].forward([parts, 1], False)
    assert np.array_equal(out, x)
    assert math.isclose(float(RULES["aten.mean.dim"].forward([x, [1, 2]], False).sum()), x.mean((1, 2)).sum())


# -- the variance sweep's (J∘J)ᵀV against brute-force Jacobians -------------------------------------------------
def _jacobian_sq(fn, x: np.ndarray, v: np.ndarray) -> np.ndarray:  # noqa: ANN001
    j = torch.autograd.functional.jacobian(fn, torch.tensor(x)).reshape(v.size, x.size).numpy()
    return ((j ** 2).T @ v.reshape(-1)).reshape(x.shape)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(2, 3), c=st.integers(1, 3), hw=st.integers(1, 3), train=st.booleans(), seed=st.integers(0, 2**16))
def test_squared_jacobian_products(n: int, c: int, hw: int, train: bool, seed: int) -> None:
    from densenet_debug.numpy_oracle.interpreter import _backward_sq

    r = np.random.default_rng(seed)
    x = r.standard_normal((n, c, hw + 1, hw + 1)) * 2 + 0.5
    w, b, rv = r.standard_normal(c), r.standard_normal(c), r.uniform(0.5, 2, c)
    bn = RULES["aten.native_batch_norm.default"]
    args = [x, w, b, np.zeros(c), rv, train, 0.1, 1e-5]
    v = r.uniform(0, 1, x.shape)
    exact = _jacobian_sq(lambda t: torch.ops.aten.native_batch_norm.default(
        t, torch.tensor(w), torch.tensor(b), torch.zeros(c, dtype=torch.float64), torch.tensor(rv), train, 0.1,
        1e-5)[0], x, v)
    mine = bn.backward_sq(args, bn.forward(args, False), (v, None, None))[0]
    assert np.allclose(mine, exact, rtol=1e-12, atol=1e-14 * np.abs(exact).max())
    wt = r.standard_normal((2, c, 3, 3))
    conv = [x, wt, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1]
    out = RULES["aten.convolution.default"].forward(conv, False)
    vo = r.uniform(0, 1, out.shape)
    exact = _jacobian_sq(lambda t: torch.ops.aten.convolution.default(t, torch.tensor(wt), None, [1, 1], [1, 1], [1, 1],
                                                                      False, [0, 0], 1), x, vo)
    assert np.allclose(_backward_sq(RULES["aten.convolution.default"], conv, out, vo)[0], exact, rtol=1e-12)
    logits = r.standard_normal((n, c + 1))
    ls = RULES["aten._log_softmax.default"]
    lo = ls.forward([logits, 1, False], False)
    vl = r.uniform(0, 1, lo.shape)
    exact = _jacobian_sq(lambda t: torch.ops.aten._log_softmax.default(t, 1, False), logits, vl)
    assert np.all(ls.backward_sq([logits, 1, False], lo, vl)[0] >= exact * (1 - 1e-12))  # an upper bound


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # the model's own float(tensor)
def test_a_model_export_cannot_trace_is_one_usage_error() -> None:
    from densenet_debug.errors import UsageError

    class ValueBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3 * 8 * 8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x.flatten(1))
            return h if float(h.sum()) > 0 else -h  # a branch on a value: not one graph

    with pytest.raises(UsageError, match="torch.export cannot trace") as info:
        compare_ops(_model(ValueBranch), *_batch())
    assert "\n" not in str(info.value)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 4), seed=st.integers(0, 2**16), slope=st.sampled_from([0.01, 0.2, -0.5]))
def test_selection_and_piecewise_rules(n: int, c: int, seed: int, slope: float) -> None:
    r = np.random.default_rng(seed)
    x, y = r.standard_normal((n, c)), r.standard_normal((1, c))
    _check_rule("aten.abs.default", torch.ops.aten.abs.default, [x], [0], seed)
    _check_rule("aten.leaky_relu.default", torch.ops.aten.leaky_relu.default, [x, slope], [0], seed)
    _check_rule("aten.where.self", torch.ops.aten.where.self, [x > 0, x, y], [1, 2], seed)
    _check_rule("aten.hardtanh.default", torch.ops.aten.hardtanh.default, [x], [0], seed)
    _check_rule("aten.clamp.default", torch.ops.aten.clamp.default, [x, -0.5, 0.5], [0], seed)
    assert np.array_equal(RULES["aten.gt.Scalar"].forward([x, 0.0], False), x > 0)


def test_detach_and_no_grad_blocks_stop_the_gradient() -> None:
    class Stops(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3 * 8 * 8, 6), nn.Linear(6, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x.flatten(1))
            with torch.no_grad():
                k = h.abs().mean()  # a scale the gradient does not see
            return self.b(h.detach() + h * k + h).double()

    report = _agrees(_model(Stops), *_batch())
    assert any(r.op == "aten.detach" for r in report.rows)


class ReentrantLayer(TorchvisionLayer):
    """The older torchvision memory-efficient layer: a reentrant checkpoint (its function runs under no_grad)."""

    def forward(self, *prev: torch.Tensor) -> torch.Tensor:
        out = cp.checkpoint(self._bottleneck, *prev, use_reentrant=True)
        return self.conv2(self.relu2(self.norm2(out)))


def test_reentrant_checkpoint_agrees_with_a_note() -> None:
    model = _model(TorchvisionNet)
    for i, layer in enumerate(model.layers):
        reentrant = ReentrantLayer(layer.norm1.num_features, 3, True)
        reentrant.load_state_dict(layer.state_dict())
        model.layers[i] = reentrant
    report = _agrees(model, *_batch())
    assert any("reentrant" in note for note in report.propagated["notes"])
