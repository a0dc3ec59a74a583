"""VarGFaceNet (Yan et al., arXiv 1910.04985), a PyTorch port of the published MXNet symbol.

Checked against github.com/zma-c-137/VarGFaceNet (VarGFaceNet.py); written anew here.
112x112x3 input, 512-d embedding (raw BatchNorm1d output, not L2-normalised).

- Variable group convolution: every "depthwise" conv is a group conv with 8 channels per
  group (groups = C/8) and channel factor 2 (C -> 2C). BN momentum 0.9 (MXNet) = 0.1 in
  PyTorch's convention, eps 2e-5. PReLU everywhere; SE with ratio 4.
- Separable unit: k x k group conv (C -> factor*C) + BN + PReLU, 1x1 conv + BN (+ PReLU).
- Normal block: two separable units (the second without its final activation), SE, add the
  identity (or a separable shortcut when the shape changes), PReLU.
- Down-sampling block: two parallel stride-2 separable branches summed, PReLU, another
  separable unit, plus a stride-2 separable shortcut, PReLU (no SE, as in the code).
- Head: conv3x3 s1 3->40 + BN + PReLU, then a stride-2 normal block (factor 1) -> 56x56x40.
  Stages: 3 units -> 28x28x80, 7 units -> 14x14x160, 4 units -> 7x7x320 (multiplier 1.25 on
  32/64/128/256).
- Embedding: 1x1 -> 1024 + BN + PReLU; 7x7 group conv (groups 1024/8) + BN; 1x1 -> 512 + BN
  + PReLU; fully connected -> embedding (with bias, as MXNet's FullyConnected) + BN1d.
"""

from __future__ import annotations

import torch
from torch import nn

from toolchain.models.mobilefacenet import ConvBNAct
from toolchain.models.registry import register_model

GROUP_BASE = 8  # channels per group in every "depthwise" conv
BN = dict(bn_eps=2e-5, bn_momentum=0.1)  # MXNet momentum 0.9 == PyTorch momentum 0.1


class SeparableUnit(nn.Sequential):
    def __init__(
        self, c_in: int, c_out: int, stride: int = 1, factor: int = 2, act_out: bool = True
    ) -> None:
        if c_in % GROUP_BASE:
            raise ValueError(f"channels {c_in} not a multiple of {GROUP_BASE}")
        super().__init__(
            ConvBNAct(c_in, c_in * factor, 3, stride, 1, groups=c_in // GROUP_BASE, **BN),
            ConvBNAct(c_in * factor, c_out, 1, act="prelu" if act_out else None, **BN),
        )


class SqueezeExcite(nn.Module):
    """SE of the reference: global avg-pool, 1x1 conv (bias) C->C/4, PReLU, 1x1 conv, sigmoid."""

    def __init__(self, channels: int, ratio: int = 4) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, channels // ratio, 1),
            nn.PReLU(channels // ratio),
            nn.Conv2d(channels // ratio, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class NormalBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1, factor: int = 2) -> None:
        super().__init__()
        same = c_in == c_out and stride == 1
        self.shortcut = (
            nn.Identity() if same else SeparableUnit(c_in, c_out, stride, factor, act_out=False)
        )
        self.body = nn.Sequential(
            SeparableUnit(c_in, c_out, stride, factor),
            SeparableUnit(c_out, c_out, 1, factor, act_out=False),
            SqueezeExcite(c_out),
        )
        self.act = nn.PReLU(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, factor: int = 2) -> None:
        super().__init__()
        self.shortcut = SeparableUnit(c_in, c_out, 2, factor, act_out=False)
        self.branch1 = SeparableUnit(c_in, c_out, 2, factor, act_out=False)
        self.branch2 = SeparableUnit(c_in, c_out, 2, factor, act_out=False)
        self.merge_act = nn.PReLU(c_out)
        self.sep2 = SeparableUnit(c_out, c_out, 1, factor, act_out=False)
        self.act = nn.PReLU(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.merge_act(self.branch1(x) + self.branch2(x))
        return self.act(self.sep2(y) + self.shortcut(x))


class VarGFaceNet(nn.Module):
    def __init__(
        self,
        embedding_size: int = 512,
        multiplier: float = 1.25,
        units: tuple[int, int, int] = (3, 7, 4),
        last_channels: int = 1024,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        f = [int(c * multiplier) for c in (32, 64, 128, 256)]  # 40, 80, 160, 320
        layers: list[nn.Module] = [
            ConvBNAct(3, f[0], 3, 1, 1, **BN),
            NormalBlock(f[0], f[0], stride=2, factor=1),  # 112 -> 56
        ]
        for c_in, c_out, n in zip(f[:-1], f[1:], units):
            layers.append(DownBlock(c_in, c_out))
            layers += [NormalBlock(c_out, c_out) for _ in range(n - 1)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            ConvBNAct(f[-1], last_channels, 1, **BN),
            ConvBNAct(last_channels, last_channels, 7, 1, 0,
                      groups=last_channels // GROUP_BASE, act=None, **BN),
            ConvBNAct(last_channels, last_channels // 2, 1, **BN),
            nn.Flatten(1),
            nn.Linear(last_channels // 2, embedding_size),
            nn.BatchNorm1d(embedding_size, eps=2e-5, momentum=0.1),
        )
        self.output_dim = embedding_size  # read by build_model for the spec
        if zero_init_residual:
            # Each block's residual branch starts at zero (its last BatchNorm's scale), so the
            # block starts as its shortcut (Goyal et al. 2017). Only the initialisation changes.
            for m in self.modules():
                if isinstance(m, NormalBlock):
                    nn.init.zeros_(m.body[1][1][1].weight)
                elif isinstance(m, DownBlock):
                    nn.init.zeros_(m.sep2[1][1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model(
    "vargfacenet",
    description="VarGFaceNet, 512-d embedding (raw, not L2-normalised), variable group conv",
)
def build_vargfacenet(embedding_size: int = 512, zero_init_residual: bool = False) -> VarGFaceNet:
    return VarGFaceNet(embedding_size=embedding_size, zero_init_residual=zero_init_residual)
