"""The int8 `.pte`'s input: transposed to NHWC while still float, then quantised.

XNNPACK runs convolutions in NHWC, so every `.pte` transposes its NCHW input inside the call.
Left to itself, XNNPACK's channels-last pass puts that transpose where the first convolution
reads, after the input quantise: a transpose of 1-byte values on 3 channels, which its X8
kernel does slowly. With the verifier (about 60 µs a call) that transpose, and the one the row
stem added, took a third of the int8 time, and the int8 `.pte` was no faster than fp32
(benchmarks/bench_pte_input_layout.py). Converting the input to channels-last as the graph's
first op, before the quantise, makes XNNPACK transpose 4-byte floats once (its fast X32 kernel)
and leaves every later tensor in NHWC.

The file still takes a contiguous NCHW tensor: the conversion is a copy inside the graph, not a
dim order on the input, so an app that fills an NCHW buffer gets the right answer (a program
exported for a channels-last *input* reads such a buffer wrongly without an error;
pytorch/executorch#21837).
"""

from __future__ import annotations

import torch
from torch import fx


def nhwc_before_quantize(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Insert a channels-last copy between the graph's image input and everything that reads it
    (in place; returns the module). It moves values and changes none."""
    image = next(n for n in graph_module.graph.nodes if n.op == "placeholder")
    with graph_module.graph.inserting_after(image):
        copy = graph_module.graph.call_function(torch.ops.aten._to_copy.default, (image,),
                                                {"memory_format": torch.channels_last})
    image.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
    graph_module.recompile()
    return graph_module


def _is_noop_as_strided(node: fx.Node) -> bool:
    """Does this as_strided copy reproduce its input element for element? Yes when the shape and
    storage offset are the input's and the strides differ only on dimensions of size 1."""
    if "as_strided" not in str(node.target):
        return False
    source = node.args[0].meta.get("val")
    size, stride = list(node.args[1]), list(node.args[2])
    offset = node.args[3] if len(node.args) > 3 else node.kwargs.get("storage_offset")
    if source is None or list(source.shape) != size or offset not in (None, source.storage_offset()):
        return False
    return all(n == 1 or s == t for n, s, t in zip(size, stride, source.stride()))


def drop_noop_as_strided(graph_module: fx.GraphModule):
    """Edge transform pass: remove as_strided copies that change no element.

    With channels-last tensors, a pooled (N, C, 1, 1) map is copied onto the contiguous strides
    before the flatten; the copy moves nothing, but XNNPACK does not take as_strided, so it
    split the verifier's program in two partitions with a portable op between them."""
    from torch.fx.passes.infra.pass_base import PassResult

    changed = False
    for node in list(graph_module.graph.nodes):
        if node.op == "call_function" and _is_noop_as_strided(node):
            node.replace_all_uses_with(node.args[0])
            graph_module.graph.erase_node(node)
            changed = True
    if changed:
        graph_module.recompile()
    return PassResult(graph_module, changed)
