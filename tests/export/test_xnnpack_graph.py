"""toolchain.export.xnnpack_graph: the XNNPACK graph inside a .pte, node by node, with the
precision of the tensors each node touches, read from the file itself."""

import numpy as np
import torch
from torch import nn

from toolchain.export.xnnpack_graph import float_nodes, op_table, xnnpack_nodes
from toolchain.models.seesawfacenet import ChannelShuffle, SqueezeExcite


class _Net(nn.Module):
    """conv -> (an optional op) -> SE (pool, flatten, linear, PReLU on a 1x1 view, sigmoid, scale)
    -> channel shuffle -> conv: SeesawFaceNet's reshapes in one small net."""

    def __init__(self, middle=None) -> None:
        super().__init__()
        self.conv, self.middle = nn.Conv2d(3, 16, 3, stride=4, padding=1), middle or nn.Identity()
        self.se, self.shuffle, self.out = SqueezeExcite(16), ChannelShuffle(2), nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.shuffle(self.se(self.middle(self.conv(x)))))


class _Abs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x)


def _pte(model: nn.Module, precision: str) -> bytes:
    from executorch.exir import to_edge_transform_and_lower

    from toolchain.export.executorch import xnnpack_partitioner
    from toolchain.quantize.pt2e import quantize_xnnpack_int8

    x = torch.zeros(1, 3, 32, 32)
    if precision == "int8":
        calib = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        model = quantize_xnnpack_int8(model, x, calib, (0.5,) * 3, (0.5,) * 3)
    program = torch.export.export(model, (x,), strict=False)
    return bytes(to_edge_transform_and_lower(program, partitioner=[xnnpack_partitioner()]).to_executorch().buffer)


def test_int8_reshapes_and_shuffle_stay_int8():
    torch.manual_seed(0)
    table = op_table(nodes := xnnpack_nodes(_pte(_Net().eval(), "int8")))
    assert float_nodes(nodes) == {}, table
    # Only the two boundary converts of the float input and output; every reshape in int8.
    assert table["Convert fp32->int8"] == 1 and table["Convert int8->fp32"] == 1, table
    assert table["StaticReshape int8"] >= 5 and "StaticReshape fp32" not in table, table
    assert table["PReLU int8"] == 1 and table["Sigmoid int8"] == 1 and table["Conv2d int8"] == 2, table


def test_a_float_island_shows_as_float_nodes():
    torch.manual_seed(0)
    nodes = xnnpack_nodes(_pte(_Net(_Abs()).eval(), "int8"))
    assert float_nodes(nodes) == {"Abs fp32": 1, "Convert fp32->int8": 1, "Convert int8->fp32": 1}, op_table(nodes)


def test_fp32_file_is_all_fp32():
    torch.manual_seed(0)
    table = op_table(xnnpack_nodes(_pte(_Net().eval(), "fp32")))
    assert table and all(k.endswith(" fp32") for k in table), table
