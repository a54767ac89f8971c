"""The autograd graph: every conv, cat and parameter present and named; highlights; collapsing; the verb."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from densenet_debug import build_model
from densenet_debug.cli import main
from densenet_debug.graph import autograd_graph, cat_readers, collapse, repeated_groups, to_dot, write_graph
from densenet_debug.models import Concat


def _names(model: nn.Module, kind: type) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, kind)}


@pytest.mark.parametrize("name", ["densenet-bc-10", "densenet-bc-16"])
def test_every_conv_cat_and_parameter_is_a_named_node(name):
    torch.manual_seed(0)
    model = build_model(name)
    graph = autograd_graph(model, torch.randn(2, 3, 16, 16))
    convs = [n for n in graph.nodes.values() if n.is_conv]
    cats = [n for n in graph.nodes.values() if n.is_cat]
    assert sorted(n.module for n in convs) == sorted(_names(model, nn.Conv2d))
    assert sorted(n.module for n in cats) == sorted(_names(model, Concat))
    params = [n.module for n in graph.nodes.values() if n.op == "parameter"]
    assert sorted(params) == sorted(n for n, _ in model.named_parameters())
    # Every 1x1 bottleneck conv and every transition conv reads a cat (through BN+ReLU); 3x3 convs do not.
    readers = {graph.nodes[i].module for i in cat_readers(graph)}
    assert readers == {n for n in _names(model, nn.Conv2d) if n.endswith(("conv1", "trans1.conv", "trans2.conv"))}
    # Every dense layer's 3x3 conv output enters a cat: the edges whose backward gets a strided slice (#708).
    into_cat = {graph.nodes[a].module for a, b in graph.edges if graph.nodes[a].is_conv and graph.nodes[b].is_cat}
    assert into_cat == {n for n in _names(model, nn.Conv2d) if n.endswith("conv2")} | {"stem"}
    assert all(a in graph.nodes and b in graph.nodes for a, b in graph.edges)


def test_dot_text_declares_every_endpoint_and_highlights():
    graph = autograd_graph(build_model("densenet-bc-10"), torch.randn(2, 3, 8, 8))
    dot = to_dot(graph, title='a "quoted" title')
    assert dot.startswith('digraph "a \\"quoted\\" title" {') and dot.rstrip().endswith("}")
    declared = {line.split()[0] for line in dot.splitlines() if "[label=" in line}
    assert declared == set(graph.nodes)
    assert dot.count('fillcolor="orange"') == len(graph.of_op("CatBackward"))
    assert dot.count("penwidth=2.5, tooltip") == sum(
        graph.nodes[a].is_conv and graph.nodes[b].is_cat for a, b in graph.edges)


def test_collapse_keeps_first_and_last_dense_layer_of_each_block():
    model = build_model("densenet-bc-40")  # 6 layers per block
    groups = repeated_groups(model)
    assert groups["block2.layer03"] == "block2.layer02…layer05" and "block2.layer01" not in groups
    assert "block2.layer06" not in groups and "block2" not in groups  # the top-level blocks stay
    full = autograd_graph(model, torch.randn(2, 3, 8, 8))
    small = collapse(full, groups)
    assert len(small.nodes) < len(full.nodes) / 2
    modules = {n.module for n in small.nodes.values()}
    assert {"block1.layer01.conv1", "block1.layer06.conv2", "block3.cat"} <= modules
    assert not any(m and m.startswith("block1.layer03") for m in modules)
    collapsed = [n for n in small.nodes.values() if n.op == "collapsed"]
    assert len(collapsed) == 3 and sum(n.members for n in collapsed) + len(small.nodes) - 3 == len(full.nodes)
    assert all(a in small.nodes and b in small.nodes and a != b for a, b in small.edges)


def test_without_graphviz_svg_falls_back_to_dot(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` on this PATH
    path, note = write_graph("digraph x {}\n", tmp_path / "g.svg")
    assert path == tmp_path / "g.dot" and path.read_text() == "digraph x {}\n"
    assert "Graphviz 'dot' is not installed" in note and not (tmp_path / "g.svg").exists()


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_svg_with_graphviz(tmp_path):
    path, note = write_graph(to_dot(autograd_graph(build_model("densenet-bc-10"), torch.randn(2, 3, 8, 8))),
                             tmp_path / "g.svg")
    assert note is None and "<svg" in path.read_text() and "block1.cat" in path.read_text()


def test_graph_verb(tmp_path, capsys):
    out = tmp_path / "g.dot"
    assert main(["graph", "--model", "densenet-bc-16", "--input-shape", "3,8,8", "--out", str(out), "--collapse"]) == 0
    assert out.read_text().startswith('digraph "densenet-bc-16"')
    assert "15 convolutions, 9 concatenations" in capsys.readouterr().out
    assert main(["graph", "--model", "nope", "--out", str(out)]) == 2
