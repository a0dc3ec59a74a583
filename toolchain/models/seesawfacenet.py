"""SeesawFaceNets (Zhang, arXiv 1908.09124): shuffle, share and DW variants.

Checked against the public code (cvtower/seesawfacenet_pytorch, src/seesaw_models/); written
anew here. MobileFaceNet skeleton, 112x112x3 input, 512-d embedding (raw, not L2-normalised;
see mobilefacenet.py for why). Every conv is followed by BN; the non-linear ones by SiLU
(the reference calls it h_swish but computes x * sigmoid(x)).

Seesaw block (in_c -> out_c, expansion G, stride s):
  split the input channels 1/4 : 3/4 -> 1x1 conv+BN+SiLU on each (to G/4 and 3G/4) -> concat
  -> channel shuffle with 2 groups ("share": none) -> depthwise 3x3 conv+BN+SiLU (stride s)
  -> squeeze-excitation (avgpool, Linear G->G/4, PReLU, Linear G/4->G, sigmoid, multiply)
  -> split 1/4 : 3/4 ("share": 3/4 : 1/4) -> linear 1x1 conv+BN on each (to out_c/4 and
  3 out_c/4; "share": 3 out_c/4 and out_c/4) -> concat -> + input when residual.
DW-SeesawFaceNet adds a mapping shortcut on the down-sampling blocks: v1 a stride-2 1x1
conv+BN+SiLU, v2 a 2x2 max-pool then a 1x1 conv+BN+SiLU.
"""

from __future__ import annotations

import torch
from torch import nn

from toolchain.models.mobilefacenet import ConvBNAct, embedding_head
from toolchain.models.registry import register_model

ACT = "silu"


class ChannelShuffle(nn.Module):
    """ShuffleNet channel shuffle: (N, g*c, H, W) -> interleave the g groups."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = self.groups
        # contiguous() spelled out: the copy a reshape after a transpose needs is then an op the
        # int8 quantizer sees (toolchain.quantize.pt2e), not one ExecuTorch's lowering adds
        # between a dequantise and the reshape, which left the reshape in float in XNNPACK.
        return x.reshape(n, g, c // g, h, w).transpose(1, 2).contiguous().reshape(n, c, h, w)


class SqueezeExcite(nn.Module):
    """SE as in the reference: Linear layers (with bias) and a PReLU between them."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(channels, channels // reduction),
            nn.PReLU(channels // reduction),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flatten, reduce, act, expand, gate = self.fc
        h = reduce(flatten(self.pool(x)))
        # PReLU on (N, C, 1, 1), not (N, C): the same values, but ExecuTorch 1.5.1's XNNPACK
        # lowering treats prelu as a channels-last op and fails on a 2-D input
        # (ChannelsLastTaggedReshapePass; upstream pytorch/executorch#18624).
        h = act(h[:, :, None, None]).flatten(1)
        scale = gate(expand(h))
        return x * scale[:, :, None, None]


class SeesawBlock(nn.Module):
    def __init__(
        self,
        c_in: int,
        c_out: int,
        expand: int,
        stride: int = 1,
        residual: bool = False,
        shuffle: bool = True,
        mapping: str | None = None,
    ) -> None:
        super().__init__()
        if residual and (c_in != c_out or stride != 1):
            raise ValueError("a residual seesaw block keeps its shape")
        self.residual = residual
        self.shuffle_variant = shuffle
        self.split_in = c_in // 4
        self.expand_a = ConvBNAct(c_in // 4, expand // 4, 1, act=ACT)
        self.expand_b = ConvBNAct(c_in - c_in // 4, expand - expand // 4, 1, act=ACT)
        self.shuffle = ChannelShuffle(2) if shuffle else nn.Identity()
        self.dw = ConvBNAct(expand, expand, 3, stride, 1, groups=expand, act=ACT)
        self.se = SqueezeExcite(expand)
        if shuffle:  # second split 1/4 : 3/4
            self.split_mid = expand // 4
            self.project_a = ConvBNAct(expand // 4, c_out // 4, 1, act=None)
            self.project_b = ConvBNAct(expand - expand // 4, c_out - c_out // 4, 1, act=None)
        else:  # "share": second split 3/4 : 1/4
            self.split_mid = expand * 3 // 4
            self.project_a = ConvBNAct(expand * 3 // 4, c_out * 3 // 4, 1, act=None)
            self.project_b = ConvBNAct(expand - expand * 3 // 4, c_out - c_out * 3 // 4, 1, act=None)
        if mapping is None or residual:
            self.mapping = None
        elif mapping == "conv":  # DW v1
            self.mapping = ConvBNAct(c_in, c_out, 1, stride, 0, act=ACT)
        elif mapping == "pool":  # DW v2
            self.mapping = nn.Sequential(
                nn.MaxPool2d(stride, stride), ConvBNAct(c_in, c_out, 1, act=ACT)
            )
        else:
            raise ValueError(f"unknown mapping {mapping!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.split_in
        y = torch.cat([self.expand_a(x[:, :s]), self.expand_b(x[:, s:])], dim=1)
        y = self.se(self.dw(self.shuffle(y)))
        m = self.split_mid
        y = torch.cat([self.project_a(y[:, :m]), self.project_b(y[:, m:])], dim=1)
        if self.residual:
            return x + y
        if self.mapping is not None:
            return self.mapping(x) + y
        return y


class SeesawFaceNet(nn.Module):
    """widths (stem, stage 3/4, stage 5), repeats per stage, expansions (down, 3, 4, down, 5)."""

    def __init__(
        self,
        embedding_size: int = 512,
        width: tuple[int, int] = (64, 128),
        repeats: tuple[int, int, int] = (4, 6, 2),
        expand: tuple[int, int, int, int] = (128, 256, 512, 256),
        shuffle: bool = True,
        mapping: str | None = None,
    ) -> None:
        super().__init__()
        w1, w2 = width
        g3, g4, g45, g5 = expand
        kw = dict(shuffle=shuffle, mapping=mapping)
        layers: list[nn.Module] = [
            ConvBNAct(3, w1, 3, 2, 1, act=ACT),  # 112 -> 56
            ConvBNAct(w1, w1, 3, 1, 1, groups=w1, act=ACT),
        ]
        for c_in, c_out, g_down, n, g in (
            (w1, w1, g3, repeats[0], g3),  # -> 28
            (w1, w2, g4, repeats[1], g4),  # -> 14
            (w2, w2, g45, repeats[2], g5),  # -> 7
        ):
            layers.append(SeesawBlock(c_in, c_out, g_down, stride=2, **kw))
            layers += [SeesawBlock(c_out, c_out, g, residual=True, **kw) for _ in range(n)]
        self.features = nn.Sequential(*layers)
        self.head = embedding_head(w2, embedding_size, act=ACT)
        self.output_dim = embedding_size  # read by build_model for the spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


_DESC = "SeesawFaceNet ({}), 512-d embedding (raw, not L2-normalised)"


@register_model("seesawfacenet", description=_DESC.format("Seesaw-shuffleFaceNet"))
def build_seesawfacenet(embedding_size: int = 512) -> SeesawFaceNet:
    return SeesawFaceNet(embedding_size, shuffle=True)


@register_model("seesawfacenet-share", description=_DESC.format("Seesaw-shareFaceNet"))
def build_seesawfacenet_share(embedding_size: int = 512) -> SeesawFaceNet:
    return SeesawFaceNet(embedding_size, shuffle=False)


_DW = dict(width=(96, 192), repeats=(8, 12, 4), expand=(192, 384, 768, 384), shuffle=True)


@register_model("dw-seesawfacenet-v1", description=_DESC.format("DW-SeesawFaceNet v1"))
def build_dw_seesawfacenet_v1(embedding_size: int = 512) -> SeesawFaceNet:
    return SeesawFaceNet(embedding_size, mapping="conv", **_DW)


@register_model("dw-seesawfacenet-v2", description=_DESC.format("DW-SeesawFaceNet v2"))
def build_dw_seesawfacenet_v2(embedding_size: int = 512) -> SeesawFaceNet:
    return SeesawFaceNet(embedding_size, mapping="pool", **_DW)
