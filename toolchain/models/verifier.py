"""The per-user verifier f(x; theta): one logit, "is this the enrolled user?".

SPEC section 1 leaves the layers to the project. Decisions:
- Input is the standard 112x112 RGB crop. The resize happens inside f, as a 4x4 stride-4
  "patchify" convolution (112 -> 28), so it counts against the budget and runs in int8; an
  average-pool resize stayed in float in ExecuTorch's int8 graph. About 1.9M multiply-adds and
  17k parameters; the int8 files stay under 40 KB.
- int8-first: only conv, depthwise conv, ReLU, average pooling and linear layers, which XNNPACK
  runs in int8. No BatchNorm, no PReLU, no L2-normalise.
- Two parts. `features` is a MobileNet-style trunk (its weights are the hypernetwork's learned
  base). `head` is a two-layer MLP whose weights the hypernetwork generates per user from the
  enrollment embedding. With `film=True` the trunk's last pointwise conv is per-user too: the
  hypernetwork modulates each of its output channels (scale and shift, folded into the conv's
  weight and bias), so the exported graph is still a plain conv. The enrolled model is a plain
  state dict.
- The model declares which of its tensors are per-user (`per_user_tensors`): enrollment writes
  them, and anything that patches per-user files reads the list from here.
"""

from __future__ import annotations

import torch
from torch import nn

from toolchain.models.registry import register_model

# Parameter-name prefix of the per-user part; everything else is the shared trunk.
HEAD_PREFIX = "head."


def _dw_separable(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in),
        nn.ReLU(inplace=False),
        nn.Conv2d(c_in, c_out, 1),
        nn.ReLU(inplace=False),
    ]


class Verifier(nn.Module):
    def __init__(self, width: int = 16, feature_dim: int = 96, hidden_dim: int = 64, film: bool = False) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 4, 4),  # 112 -> 28: the in-graph resize, learned
            nn.ReLU(inplace=False),
            *_dw_separable(w, 2 * w, 1),  # 28
            *_dw_separable(2 * w, 4 * w, 2),  # 14
            *_dw_separable(4 * w, feature_dim, 2),  # 7
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        self.head = nn.Sequential(
            nn.Linear(feature_dim, hidden_dim),
            nn.ReLU(inplace=False),
            nn.Linear(hidden_dim, 1),
        )
        self.feature_dim = feature_dim
        self.hidden_dim = hidden_dim
        self.film = film

    # Index in `features` of the last pointwise conv (per-user with film), and where its ReLU is.
    LAST_CONV = 12

    @property
    def last_conv(self) -> nn.Conv2d:
        return self.features[self.LAST_CONV]

    def per_user_tensors(self) -> list[str]:
        """State-dict names that differ between users; the rest is shared by every user."""
        names = [n for n in self.state_dict() if n.startswith(HEAD_PREFIX)]
        if self.film:
            names = [f"features.{self.LAST_CONV}.weight", f"features.{self.LAST_CONV}.bias"] + names
        return names

    @property
    def input_conv(self) -> nn.Conv2d:
        """The first layer (unpadded), where the int8 export folds its input normalisation."""
        return self.features[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model(
    "verifier",
    output="logit",
    output_dim=1,
    description="per-user verifier f: shared trunk + generated 2-layer head, one logit",
)
def build_verifier(**kw) -> Verifier:
    return Verifier(**kw)
