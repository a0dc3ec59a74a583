"""How a float model is fed and read: uint8 images to its normalised input, and batched,
L2-normalised embeddings (the insightface protocol: image plus mirror). Shared by training,
evaluation and the pipeline, so it sits below all three."""

from __future__ import annotations

import numpy as np
import torch

MEAN = STD = 0.5  # insightface normalisation, the zoo's ModelSpec default


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Normalised float (N,3,H,W) -> uint8 (N,3,H,W); lossless for images that came from uint8."""
    return (images * STD + MEAN).mul(255).round().clamp(0, 255).to(torch.uint8)


def from_uint8(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N,3,H,W) -> normalised float32, the models' input."""
    x = (images.float() / 255.0 - MEAN) / STD
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def nhwc_uint8_to_input(images: np.ndarray, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N,H,W,3) numpy -> normalised float32 NCHW tensor."""
    t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return from_uint8(t, channels_last)


@torch.no_grad()
def embed(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 128, flip: bool = True,
          channels_last: bool = True, device: torch.device | None = None) -> torch.Tensor:
    """L2-normalised embeddings of normalised images (N,3,H,W), optionally of image + its mirror
    summed (the insightface protocol). Returns float32 (N, D) on the CPU."""
    from torch.nn import functional as F

    model.eval()
    device = device or torch.device("cpu")
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        x = (from_uint8(x) if x.dtype == torch.uint8 else x.float()).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if flip:  # image and mirror in one batch: one forward pass instead of two
            both = model(torch.cat([x, torch.flip(x, dims=[3])]))
            e = both[:len(x)] + both[len(x):]
        else:
            e = model(x)
        out.append(F.normalize(e.float(), dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0)
