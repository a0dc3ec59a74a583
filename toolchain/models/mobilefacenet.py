"""MobileFaceNet (Chen et al., 2018) and the conv building blocks the zoo shares.

Layout (112x112x3 input, as in the paper and the common PyTorch ports):
conv3x3 s2 ->64; depthwise 3x3 64; bottleneck s2 (expansion 128) 64; 4 residual (128) 64;
bottleneck s2 (256) ->128; 6 residual (256); bottleneck s2 (512) 128; 2 residual (256);
1x1 ->512; linear 7x7 depthwise "GDConv"; Linear 512->embedding (no bias); BatchNorm1d.
PReLU after every non-linear conv, BN after every conv.

The forward pass returns the raw embedding (BatchNorm1d output). L2-normalisation is left to the
caller (ArcFace head, evaluation protocol): an L2-normalize at the end of an exported graph is
not delegated by ExecuTorch's XNNPACK backend and would split the graph (shared/STACK.md).
"""

from __future__ import annotations

import torch
from torch import nn

from toolchain.models.registry import register_model


def make_act(kind: str | None, channels: int) -> nn.Module:
    """Activation by name; PReLU is per-channel as in the reference code."""
    if kind is None:
        return nn.Identity()
    if kind == "prelu":
        return nn.PReLU(channels)
    if kind == "silu":  # SeesawFaceNet's "h_swish" computes x * sigmoid(x), which is SiLU
        return nn.SiLU()
    if kind == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {kind!r}")


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias; BN follows) + BatchNorm2d + optional activation."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        act: str | None = "prelu",
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(c_out, eps=bn_eps, momentum=bn_momentum),
            make_act(act, c_out),
        )


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand + depthwise 3x3 + linear 1x1 project (+ identity)."""

    def __init__(self, c_in: int, c_out: int, expand: int, stride: int, residual: bool) -> None:
        super().__init__()
        if residual and (c_in != c_out or stride != 1):
            raise ValueError("a residual bottleneck keeps its shape")
        self.residual = residual
        self.body = nn.Sequential(
            ConvBNAct(c_in, expand, 1),
            ConvBNAct(expand, expand, 3, stride, 1, groups=expand),
            ConvBNAct(expand, c_out, 1, act=None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


def embedding_head(c_in: int, embedding_size: int, act: str) -> nn.Sequential:
    """1x1 -> 512, linear 7x7 depthwise (GDConv), Linear -> embedding (no bias), BN1d."""
    return nn.Sequential(
        ConvBNAct(c_in, 512, 1, act=act),
        ConvBNAct(512, 512, 7, 1, 0, groups=512, act=None),
        nn.Flatten(1),
        nn.Linear(512, embedding_size, bias=False),
        nn.BatchNorm1d(embedding_size),
    )


class MobileFaceNet(nn.Module):
    def __init__(self, embedding_size: int = 512) -> None:
        super().__init__()
        stages: list[nn.Module] = [
            ConvBNAct(3, 64, 3, 2, 1),  # 112 -> 56
            ConvBNAct(64, 64, 3, 1, 1, groups=64),
        ]
        # (c_in, c_out, expansion of the strided block, residual repeats, their expansion)
        for c_in, c_out, down_expand, repeats, expand in (
            (64, 64, 128, 4, 128),  # -> 28
            (64, 128, 256, 6, 256),  # -> 14
            (128, 128, 512, 2, 256),  # -> 7
        ):
            stages.append(Bottleneck(c_in, c_out, down_expand, 2, residual=False))
            stages += [Bottleneck(c_out, c_out, expand, 1, residual=True) for _ in range(repeats)]
        self.features = nn.Sequential(*stages)
        self.head = embedding_head(128, embedding_size, act="prelu")
        self.output_dim = embedding_size  # read by build_model for the spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model(
    "mobilefacenet",
    output="embedding",
    output_dim=512,
    description="MobileFaceNet, 512-d embedding (raw, not L2-normalised), PReLU",
)
def build_mobilefacenet(embedding_size: int = 512) -> MobileFaceNet:
    return MobileFaceNet(embedding_size=embedding_size)
