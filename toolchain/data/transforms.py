"""Array <-> tensor conversion and the few augmentations face recognition uses.

Normalisation everywhere is insightface's: x_float = (x_uint8 / 255 - 0.5) / 0.5.
"""

from __future__ import annotations

import numpy as np
import torch

MEAN = 0.5
STD = 0.5


def to_tensor(images) -> torch.Tensor:
    """uint8 NHWC (or one HWC) array -> float32 NCHW (or CHW) tensor in [-1, 1]."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N,)H,W,3 images, got {arr.shape} {arr.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t.permute(0, 3, 1, 2) if arr.ndim == 4 else t.permute(2, 0, 1)
    return t.float().div_(255.0).sub_(MEAN).div_(STD).contiguous()


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of to_tensor (rounded): float NCHW/CHW in [-1, 1] -> uint8 NHWC/HWC."""
    x = (tensor.detach().float() * STD + MEAN) * 255.0
    x = x.round_().clamp_(0, 255).to(torch.uint8)
    x = x.permute(0, 2, 3, 1) if x.ndim == 4 else x.permute(1, 2, 0)
    return x.contiguous().numpy()


def hflip(x):
    """Horizontal flip: a torch tensor is (N,)C,H,W (flips the last dim); a numpy array is
    (N,)H,W,C uint8 (flips the width axis, -2)."""
    if isinstance(x, torch.Tensor):
        return torch.flip(x, dims=(-1,))
    return np.ascontiguousarray(np.asarray(x)[..., ::-1, :])


class RandomHFlip:
    """Flip a CHW tensor with probability p (training augmentation)."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        self.p = p
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand((), generator=self.generator).item() < self.p:
            return hflip(x)
        return x


class Compose:
    def __init__(self, *transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x
