"""Which autograd nodes one module call created, found by sequence number, without wrapping any tensor.

Module full backward hooks wrap a module's inputs and outputs in a ``BackwardHookFunction``; an in-place op on
such an output (``nn.ReLU(inplace=True)`` after a BN, ``F.relu(x, inplace=True)``) is then forbidden and the
step crashes. This module finds the same information from the graph as it is:

- Autograd numbers every node it creates from a thread-local counter (``_get_sequence_nr`` reads the next
  number). The nodes one call created are those numbered between the counter read in the forward pre-hook
  and in the post-hook (AccumulateGrad nodes all carry 2**64-1 and are never inside a range).
- Walking from the outputs' gradient edges through ``next_functions`` and staying inside that range yields
  the call's nodes; those with a next edge equal to an input's gradient edge (taken in the pre-hook, before
  any in-place change rebases the input) are where the input's gradient *through this call only* leaves.
- A pre-hook on an output's node sees exactly the gradient that node's backward receives, in the layout it
  receives it (a torch.cat backward slice stays a non-contiguous view: the #708 layout).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.graph import Node, get_gradient_edge

Edge = tuple[Node, int]


def next_sequence_nr() -> int:
    """The sequence number autograd will give the next node created on this thread."""
    return torch._C._autograd._get_sequence_nr()


def gradient_edge(t: object) -> Edge | None:
    """Where the gradient of ``t`` flows (its node and the node's input number), or None if it needs none."""
    if not isinstance(t, Tensor) or not t.requires_grad:
        return None
    edge = get_gradient_edge(t)
    return edge.node, edge.output_nr


@dataclass(frozen=True)
class InputFeed:
    """Node ``node`` sends its ``position``-th gradient to input ``input_index`` of the call."""

    node: Node
    position: int
    input_index: int


@dataclass(frozen=True)
class CallGraph:
    """The nodes one call created (reachable from its outputs) and where its inputs' gradients leave them."""

    nodes: tuple[Node, ...]
    feeds: tuple[InputFeed, ...]


def call_graph(first: int, last: int, output_edges: Sequence[Edge | None],
               input_edges: Sequence[Edge | None]) -> CallGraph:
    """The nodes numbered in ``[first, last)`` reachable from ``output_edges``, and the input feeds.

    An output that is an input passed through unchanged has a node outside the range and adds nothing.
    """
    wanted = {(id(e[0]), e[1]): i for i, e in enumerate(input_edges) if e is not None}
    stack = [e[0] for e in output_edges if e is not None]
    seen: set[int] = set()
    nodes: list[Node] = []
    feeds: list[InputFeed] = []
    while stack:
        node = stack.pop()
        if id(node) in seen or not first <= node._sequence_nr() < last:
            continue
        seen.add(id(node))
        nodes.append(node)
        for position, (nxt, nr) in enumerate(node.next_functions):
            if nxt is None:
                continue
            i = wanted.get((id(nxt), nr))
            if i is not None:
                feeds.append(InputFeed(node, position, i))
            stack.append(nxt)
    return CallGraph(tuple(nodes), tuple(feeds))
