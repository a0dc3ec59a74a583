"""Helpers the trainers share: progress bars, LR schedules, seeding, thread counts."""

from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import torch

from toolchain.console import progress_bar  # noqa: F401  (the trainers' progress bars)

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
