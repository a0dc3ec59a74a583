"""The int8 .pte's input goes channels-last as float, before its quantise
(toolchain.export.nhwc_input), and the as_strided copies that this leaves are dropped only where
they move no element."""

import torch
from torch import fx, nn

from toolchain.export.nhwc_input import _is_noop_as_strided, drop_noop_as_strided, nhwc_before_quantize


class _ConvPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool, self.fc = nn.Conv2d(3, 8, 3, 2), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def test_nhwc_before_quantize_is_the_first_op_and_changes_no_value():
    torch.manual_seed(0)
    model, x = _ConvPool().eval(), torch.randn(1, 3, 16, 16)
    graph_module = torch.export.export(model, (x,), strict=False).module()
    expected = graph_module(x)
    nhwc_before_quantize(graph_module)
    image = next(n for n in graph_module.graph.nodes if n.op == "placeholder")
    (copy,) = image.users  # the only reader of the input
    assert copy.target == torch.ops.aten._to_copy.default and copy.kwargs["memory_format"] == torch.channels_last
    # The copy moves values, it changes none; torch's channels-last conv may sum in another order.
    assert torch.allclose(graph_module(x), expected, atol=1e-6)
    # Traced again, every 4-D tensor after the copy is channels-last.
    program = torch.export.export(graph_module, (x,), strict=False)
    conv = next(n for n in program.graph.nodes if n.target == torch.ops.aten.conv2d.default)
    assert conv.meta["val"].is_contiguous(memory_format=torch.channels_last)


def _as_strided(source: torch.Tensor, size, stride, offset=None) -> fx.Node:
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = source
    args = (x, list(size), list(stride)) + (() if offset is None else (offset,))
    return graph.call_function(torch.ops.aten.as_strided_copy.default, args)


def test_only_as_strided_copies_that_move_nothing_count_as_noops():
    pooled = torch.empty(1, 96, 1, 1).contiguous(memory_format=torch.channels_last)  # strides (96, 1, 96, 96)
    assert _is_noop_as_strided(_as_strided(pooled, (1, 96, 1, 1), (96, 1, 1, 1)))  # size-1 strides only
    assert not _is_noop_as_strided(_as_strided(pooled, (1, 96, 1, 1), (96, 1, 1, 1), offset=3))
    assert not _is_noop_as_strided(_as_strided(pooled, (1, 48, 1, 1), (48, 1, 1, 1)))
    feature_map = torch.empty(1, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    # NHWC onto NCHW strides: a real transpose.
    assert not _is_noop_as_strided(_as_strided(feature_map, (1, 8, 7, 7), (392, 49, 7, 1)))


def test_drop_noop_as_strided_leaves_a_real_one():
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(1, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    real = graph.call_function(torch.ops.aten.as_strided_copy.default, (x, [1, 8, 7, 7], [392, 49, 7, 1]))
    pooled = graph.call_function(torch.ops.aten.mean.dim, (real, [2, 3], True))
    pooled.meta["val"] = torch.empty(1, 8, 1, 1).contiguous(memory_format=torch.channels_last)
    noop = graph.call_function(torch.ops.aten.as_strided_copy.default, (pooled, [1, 8, 1, 1], [8, 1, 1, 1]))
    graph.output(noop)
    graph_module = fx.GraphModule(nn.Module(), graph)
    assert drop_noop_as_strided(graph_module).modified
    left = [n for n in graph_module.graph.nodes if n.target == torch.ops.aten.as_strided_copy.default]
    assert left == [real]
    out = next(n for n in graph_module.graph.nodes if n.op == "output")
    assert out.args[0] is pooled
