"""The autograd graph of one training step, as Graphviz DOT (SVG/PNG/PDF when Graphviz's ``dot`` is installed).

The walk starts at the loss's ``grad_fn`` and follows ``next_functions`` (the seed's ``make_graph.py`` did the
same with the pre-0.2 ``creator``/``previous_functions``). Nodes carry the module that produced them
(forward hooks map each module output's ``grad_fn`` to the module) and parameters their names. Highlighted,
because they are where the 2017 cuDNN bug lived:

- concatenations (orange);
- convolutions that read a concatenation, directly or through BN/ReLU (red outline);
- edges from a convolution into a concatenation (bold red): in backward, that convolution receives a
  channel slice of the cat's gradient, a non-contiguous tensor with a storage offset (pytorch#708).

``collapse=True`` folds runs of repeated sibling modules (same class, names differing only in a number, at
least three, below the top level: the dense layers of a block) into one node, keeping the first and last, so
DenseNet-BC-100's ~700-node graph stays readable.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_debug import atomic
from densenet_debug.errors import UsageError

RENDERED = ("svg", "png", "pdf")
SUFFIXES = (".dot", ".gv", ".svg", ".png", ".pdf")  # DOT text, or rendered by Graphviz
_PASS_THROUGH = {"NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0",
                 "ReluBackward0", "ThresholdBackward0"}


@dataclass
class Node:
    id: str
    op: str  # grad_fn class name, or "parameter"
    module: str | None = None  # qualified name of the module whose output this is / that owns the parameter
    shape: tuple[int, ...] | None = None
    members: int = 1  # how many original nodes a collapsed node stands for

    @property
    def is_cat(self) -> bool:
        return self.op.startswith("CatBackward")

    @property
    def is_conv(self) -> bool:
        return self.op.startswith(("ConvolutionBackward", "CudnnConvolutionBackward", "MkldnnConvolutionBackward"))


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: set[tuple[str, str]] = field(default_factory=set)  # (producer, consumer): forward direction

    def inputs_of(self, node: str) -> list[str]:
        return sorted(a for a, b in self.edges if b == node)

    def of_op(self, prefix: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.op.startswith(prefix)]


def autograd_graph(model: nn.Module, x: Tensor, y: Tensor | None = None) -> Graph:
    """Graph of ``cross_entropy(model(x), y)`` (y = zeros by default); the model's weights are not touched."""
    produced: dict[object, str] = {}

    def hook(name: str):
        def record(_m: nn.Module, _inp: object, out: object) -> None:
            if isinstance(out, Tensor) and out.grad_fn is not None:
                produced.setdefault(out.grad_fn, name)  # inner modules finish first: keep the innermost
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    if y is None:
        y = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
    loss = F.cross_entropy(out, y)
    params = {id(p): n for n, p in model.named_parameters()}
    graph = Graph()
    ids: dict[object, str] = {}
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn in ids:
            continue
        nid = ids[fn] = f"n{len(ids)}"
        variable = getattr(fn, "variable", None)
        if variable is not None:
            graph.nodes[nid] = Node(nid, "parameter", params.get(id(variable)), tuple(variable.shape))
        else:
            graph.nodes[nid] = Node(nid, type(fn).__name__, produced.get(fn))
        stack.extend(g for g, _ in fn.next_functions if g is not None and g not in ids)
    for fn, nid in ids.items():
        for g, _ in fn.next_functions:
            if g is not None:
                graph.edges.add((ids[g], nid))
    _inherit_modules(graph)
    return graph


def _inherit_modules(graph: Graph) -> None:
    """An op no hook saw (a weight transpose, a view) belongs to the module of its only consumer."""
    consumers: dict[str, set[str]] = defaultdict(set)
    for a, b in graph.edges:
        consumers[a].add(b)
    changed = True
    while changed:
        changed = False
        for node in graph.nodes.values():
            if node.module is None:
                owners = {graph.nodes[c].module for c in consumers[node.id]}
                if len(owners) == 1 and None not in owners:
                    node.module = owners.pop()
                    changed = True


def repeated_groups(model: nn.Module) -> dict[str, str]:
    """Module name -> collapsed-group name for the middle members of runs of repeated siblings."""
    groups: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        if not parent_name:
            continue  # the top level (stages such as block1..3) is the architecture's outline: keep it
        runs: dict[tuple[type, str], list[str]] = defaultdict(list)
        for child_name, child in parent.named_children():
            stem = re.sub(r"\d+$", "", child_name)
            if stem != child_name:
                runs[(type(child), stem)].append(child_name)
        for names in runs.values():
            if len(names) >= 3:
                middle = names[1:-1]
                label = f"{parent_name}.{middle[0]}" + (f"…{middle[-1]}" if len(middle) > 1 else "")
                for n in middle:
                    groups[f"{parent_name}.{n}"] = label
    return groups


def collapse(graph: Graph, groups: dict[str, str]) -> Graph:
    """Merge every node owned by a module in ``groups`` (or below it) into one node per group."""
    def group_of(module: str | None) -> str | None:
        while module:
            if module in groups:
                return groups[module]
            module = module.rpartition(".")[0]
        return None

    out = Graph()
    target: dict[str, str] = {}
    for node in graph.nodes.values():
        g = group_of(node.module)
        if g is None:
            out.nodes[node.id] = node
            target[node.id] = node.id
            continue
        gid = "g_" + re.sub(r"\W", "_", g)
        if gid not in out.nodes:
            out.nodes[gid] = Node(gid, "collapsed", g, members=0)
        out.nodes[gid].members += 1
        target[node.id] = gid
    out.edges = {(target[a], target[b]) for a, b in graph.edges if target[a] != target[b]}
    return out


def cat_readers(graph: Graph) -> set[str]:
    """Convolutions whose input comes from a concatenation, directly or through BN/ReLU."""
    readers = set()
    for node in graph.nodes.values():
        if not node.is_conv:
            continue
        frontier, seen = graph.inputs_of(node.id), set()
        while frontier:
            nid = frontier.pop()
            if nid in seen:
                continue
            seen.add(nid)
            src = graph.nodes[nid]
            if src.is_cat:
                readers.add(node.id)
            elif src.op in _PASS_THROUGH:
                frontier.extend(graph.inputs_of(nid))
    return readers


def to_dot(graph: Graph, title: str = "autograd graph") -> str:
    readers = cat_readers(graph)
    lines = [f"digraph {_q(title)} {{", '  node [shape=box, style=filled, fillcolor=white, fontsize=10];',
             f"  label={_q(title)}; labelloc=t;"]
    for node in graph.nodes.values():
        attrs = {"label": _label(node)}
        if node.op == "parameter":
            attrs.update(fillcolor="lightblue", shape="ellipse")
        elif node.op == "collapsed":
            attrs.update(fillcolor="lightgrey", style="filled,dashed")
        elif node.is_cat:
            attrs.update(fillcolor="orange")
        elif node.is_conv:
            attrs.update(fillcolor="khaki")
        if node.id in readers:
            attrs.update(color="red", penwidth="2.5")
        lines.append(f"  {node.id} [{', '.join(f'{k}={_q(v)}' for k, v in attrs.items())}];")
    for a, b in sorted(graph.edges):
        slice_edge = graph.nodes[a].is_conv and graph.nodes[b].is_cat
        style = ' [color=red, penwidth=2.5, tooltip="backward: grad slice of the cat"]' if slice_edge else ""
        lines.append(f"  {a} -> {b}{style};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _label(node: Node) -> str:
    if node.op == "parameter":
        shape = "x".join(map(str, node.shape or ()))
        return f"{node.module or '?'}\n{shape}"
    if node.op == "collapsed":
        return f"{node.module}\n({node.members} nodes, same structure as the first and last)"
    return f"{node.module}\n{node.op}" if node.module else node.op


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def write_graph(dot: str, out: str | os.PathLike) -> tuple[Path, str | None]:
    """Write DOT, or render it with Graphviz for .svg/.png/.pdf; without ``dot`` write .dot and say so."""
    out = Path(out)
    fmt = out.suffix.lstrip(".").lower()
    if out.suffix.lower() not in SUFFIXES:
        raise UsageError(f"cannot write {out}: the format follows the extension; use one of {', '.join(SUFFIXES)}")
    if fmt not in RENDERED:
        atomic.write_text(out, dot)
        return out, None
    exe = shutil.which("dot")
    if exe is None:
        fallback = out.with_suffix(".dot")
        atomic.write_text(fallback, dot)
        return fallback, (f"Graphviz 'dot' is not installed: wrote {fallback} instead of {out} "
                          f"(render it with: dot -T{fmt} {fallback} -o {out})")
    with atomic.writing_file(out) as tmp:
        done = subprocess.run([exe, f"-T{fmt}", "-o", str(tmp)], input=dot.encode(), capture_output=True)
        if done.returncode != 0:  # an environment problem (a Graphviz without this format), not our bug
            raise UsageError(f"Graphviz {exe} -T{fmt} failed: "
                             f"{(done.stderr.decode(errors='replace').strip().splitlines() or ['?'])[0]}")
    return out, None
