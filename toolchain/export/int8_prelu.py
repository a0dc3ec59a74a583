"""The int8 `.tflite`'s form of PReLU: the same function on ops LiteRT runs in int8.

LiteRT's XNNPACK delegate refuses an int8 PRELU: each one was a float island, a dequantise and a
quantise, in the backbones' int8 `.tflite` files (MobileFaceNet has 33). Per channel, since
x = relu(x) - relu(-x),

    prelu(x) = relu(x) - a*relu(-x) = x + (1 - a)*relu(-x) = x + s*relu(-|1 - a|*x),  s = sign(1 - a)

so PReLU becomes a depthwise 1x1 convolution (weights -|1 - a|) with a fused ReLU, added to its
own input: conv+relu and add, which both quantizers annotate and both delegates run in int8.
Where some 1 - a < 0, a second depthwise 1x1 (weights s = +-1) follows the ReLU. Exact in float
(up to rounding). In the `.tflite` the add and the branch share the input's grid step, so the
add sums integers exactly and the ReLU branch's rounding is the only new one
(toolchain.export.tflite_calibration.exact_prelu_adds). This form costs two int8 passes over the
tensor; the earlier a*x + (1 - a)*relu(x) cost three (README, `benchmarks/bench_prelu_forms.py`). A PReLU on a 2-D tensor runs on an
(N, C, 1, 1) view. A PReLU with one shared slope is left as it is (the backbones here have
per-channel slopes). The int8 `.pte` does not need this form: XNNPACK's own int8 PReLU, one op,
runs there (toolchain.quantize.pt2e annotates it, toolchain.export.executorch's partitioner takes
it), and is faster. The fp32 artifacts keep the plain PReLU, which is one float op.
"""

from __future__ import annotations

import torch
from torch import nn

from toolchain.export.module_swap import replace_modules


def _depthwise_1x1(weights: torch.Tensor) -> nn.Conv2d:
    c = len(weights)
    conv = nn.Conv2d(c, c, 1, groups=c, bias=False)
    with torch.no_grad():
        conv.weight.copy_(weights.view(c, 1, 1, 1))
    return conv


class Int8PReLU(nn.Module):
    """prelu(x) as x + s*relu(-|1 - a|*x) on a depthwise 1x1 convolution (module docstring)."""

    def __init__(self, prelu: nn.PReLU) -> None:
        super().__init__()
        a = prelu.weight.detach().float().flatten()
        self.negative = _depthwise_1x1(-(1 - a).abs())
        sign = torch.where(1 - a < 0, -1.0, 1.0)
        self.sign = _depthwise_1x1(sign) if bool((sign < 0).any()) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() == 2
        if flat:
            x = x[:, :, None, None]
        below = torch.relu(self.negative(x))
        if self.sign is not None:
            below = self.sign(below)
        y = x + below
        return y.flatten(1) if flat else y


def with_int8_prelu(model: nn.Module) -> nn.Module | None:
    """A copy of `model` with every per-channel PReLU rewritten (see module docstring), or None
    when it has none."""
    return replace_modules(model, lambda m: isinstance(m, nn.PReLU) and m.num_parameters > 1, Int8PReLU)
