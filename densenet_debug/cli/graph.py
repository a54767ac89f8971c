"""``densenet-debug graph``: draw the autograd graph of one training step."""

from __future__ import annotations

import argparse
import sys

import torch

from densenet_debug.cli._common import add_model_args, add_seed_arg, check_outputs, load_model, require_parameters
from densenet_debug.graph import (
    SUFFIXES,
    autograd_graph,
    cat_readers,
    collapse,
    repeated_groups,
    to_dot,
    write_graph,
)
from densenet_debug.models.batch import check_batch_of_one, output_classes

HELP = ("write the autograd graph (grad_fn.next_functions) with parameter names, concatenations and the convs "
        "around them highlighted, as DOT or (with Graphviz) SVG/PNG/PDF")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser, batch=2)
    add_seed_arg(parser)
    parser.add_argument("--out", default="graph.dot",
                        help="the format follows the extension: .dot/.gv DOT text, .svg/.png/.pdf rendered by "
                             "Graphviz's dot when installed (else DOT beside it and a note) (default graph.dot)")
    parser.add_argument("--collapse", action="store_true",
                        help="fold repeated dense layers (all but the first and last of each block) into one node")


def run(args: argparse.Namespace) -> int:
    check_outputs(args, out=SUFFIXES)
    model = load_model(args)
    require_parameters(model, args.model, "a training step builds no autograd graph to draw")
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch, *args.input_shape)
    if args.batch == 1:  # a squeezed output has lost its batch dimension: one line, not a traceback
        classes = args.num_classes or output_classes(model, torch.cat([x, x]), args.model)
        check_batch_of_one(model, x, classes, args.model)
    graph = autograd_graph(model.train(), x)
    full = len(graph.nodes)
    if args.collapse:
        graph = collapse(graph, repeated_groups(model))
    path, note = write_graph(to_dot(graph, title=args.model), args.out)
    convs, cats = len([n for n in graph.nodes.values() if n.is_conv]), len(graph.of_op("CatBackward"))
    print(f"wrote {path}: {len(graph.nodes)} nodes (of {full}), {convs} convolutions, {cats} concatenations, "
          f"{len(cat_readers(graph))} convs reading a concatenation")
    if note:
        print(note, file=sys.stderr)
    return 0
