"""The int8 artifacts' form of SiLU: x * sigmoid(x), written out.

ExecuTorch's XNNPACK quantizer annotates neither `silu` nor `sigmoid`, so each SiLU of
SeesawFaceNet (48) was a float island inside the int8 .pte. Written as a sigmoid and a multiply,
it becomes two ops the toolchain's quantizer annotates (sigmoid: toolchain.quantize.pt2e) and
XNNPACK runs in int8. Exact in float (up to rounding). The fp32 artifacts keep the one SiLU op;
LiteRT's files are the same either way (ONNX has no SiLU: torch exports it as Sigmoid and Mul).
"""

from __future__ import annotations

import torch
from torch import nn

from toolchain.export.module_swap import replace_modules


class SiLUAsSigmoidMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def with_int8_silu(model: nn.Module) -> nn.Module | None:
    """A copy of `model` with every nn.SiLU written as x * sigmoid(x), or None when it has none."""
    return replace_modules(model, lambda m: isinstance(m, nn.SiLU), lambda m: SiLUAsSigmoidMul())
