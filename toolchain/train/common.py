"""Helpers the trainers share: progress bars, LR schedules, seeding, image batches."""

from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import torch

from toolchain.console import progress_bar  # noqa: F401  (the trainers' progress bars)

MEAN = STD = 0.5  # insightface normalisation, the zoo's ModelSpec default


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run the block with `n` intra-op CPU threads (None: leave torch's setting)."""
    prior = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prior)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str):
    """Mixed precision for a training step's forward and loss: "off", "bf16" or "fp16" (on CUDA,
    with a GradScaler, see `grad_scaler`; on CPU both run through torch's CPU autocast)."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def grad_scaler(device: torch.device, amp: str) -> "torch.amp.GradScaler":
    """Loss scaling, on only for fp16 on CUDA (bf16 has float32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16" and device.type == "cuda")


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR factor: linear warm-up, then cosine decay to zero at `total_steps`."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_rng(*keys: int) -> np.random.Generator:
    """A generator that is a pure function of its keys (seed, step, rank...): resumable sampling."""
    return np.random.default_rng([int(k) for k in keys])


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


@contextlib.contextmanager
def one_intraop_thread():
    """Run torch on one intra-op thread inside the block. oneDNN's convolutions round differently
    with 1 and 2 threads (measured), so anything that must give the same floats on every machine
    (enrollment: its files are compared byte for byte) runs on exactly one."""
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


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
