"""The int8 artifacts' form of a patchify stem: the same arithmetic, laid out for XNNPACK.

A k x k stride-k unpadded convolution on the 3-channel image (the verifier's 4x4/4 stem) is,
in XNNPACK's int8 kernels, mostly padding: they read input channels in groups of 8 per kernel
tap (on x86 without VNNI), so 3 channels cost as much as 8. Measured with
benchmarks/bench_verifier_layers.py on this project's AVX2 machine, that stem alone took about
4x its fp32 time in LiteRT, half the int8 verifier's latency.

In NHWC memory, k neighbouring pixels of a row are k*3 consecutive values, so reshaping
(H, W, 3) to (H, W/k, 3k) is free, and the stem becomes a k x 1 stride-(k, 1) convolution on 3k
channels with the same weights rearranged: 12 channels pad to 16, not 3 to 8. Outputs are equal
up to float summation order (exactly equal in int8: the same integer products are summed).
onnx2tf turns it into one RESHAPE and one CONV_2D; ExecuTorch lowers it to one XNNPACK
partition. The fp32 artifacts keep the plain convolution, which is faster in float.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class RowStem(nn.Module):
    """conv(x) for a k x k stride-k unpadded `conv`, computed as a reshape + k x 1 conv."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        k = conv.kernel_size[0]
        c_in, c_out = conv.in_channels, conv.out_channels
        self.k = k
        self.conv = nn.Conv2d(k * c_in, c_out, (k, 1), (k, 1), bias=conv.bias is not None)
        with torch.no_grad():
            # (o, c, kh, kw) -> (o, kw * c_in + c, kh, 1): channel order of the NHWC row reshape.
            self.conv.weight.copy_(conv.weight.permute(0, 3, 1, 2).reshape(c_out, k * c_in, k, 1))
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n, h, w // self.k, self.k * c).permute(0, 3, 1, 2)
        # contiguous: otherwise every later tensor is traced channels-last and the exported
        # graph gets an as_strided copy XNNPACK does not take.
        rows = rows.contiguous()
        return self.conv(rows)


def is_patchify(conv: nn.Module, width: int) -> bool:
    """A square k x k stride-k conv (k > 1) with no padding, dilation or groups, tiling `width`."""
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.dilation != (1, 1):
        return False
    k = conv.kernel_size[0]
    unpadded = conv.padding == "valid" or not any(conv.padding)
    return k > 1 and conv.kernel_size == (k, k) and conv.stride == (k, k) and unpadded and width % k == 0


def with_row_stem(model: nn.Module, width: int) -> nn.Module | None:
    """A copy of `model` whose `input_conv` is computed as a RowStem; None when it has no
    patchify stem. The copy keeps `.spec`; it is for export only."""
    conv = getattr(model, "input_conv", None)
    if not is_patchify(conv, width):
        return None
    name = next(n for n, m in model.named_modules() if m is conv)
    rewritten = copy.deepcopy(model)
    parent_name, _, attr = name.rpartition(".")
    parent = rewritten.get_submodule(parent_name) if parent_name else rewritten
    setattr(parent, attr, RowStem(getattr(parent, attr)))
    return rewritten.eval()
