"""Image batches in, model tensors out: the one place the normalisation is applied.

Images are uint8 RGB, NHWC (N, H, W, 3). The float models take (x/255 - mean)/std in NCHW.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from toolchain.errors import ToolchainError


def check_images(images: np.ndarray, hw: Sequence[int] | None = None, what: str = "images") -> np.ndarray:
    """Return `images` as a uint8 (N, H, W, 3) array or raise ToolchainError naming the problem."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ToolchainError(f"{what}: expected uint8 images (N, H, W, 3), got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        raise ToolchainError(f"{what}: expected dtype uint8, got {arr.dtype}")
    if arr.shape[0] == 0:
        raise ToolchainError(f"{what}: empty (no images)")
    if hw is not None and tuple(arr.shape[1:3]) != tuple(hw):
        raise ToolchainError(f"{what}: wrong input size {arr.shape[1]}x{arr.shape[2]}, "
                             f"the model takes {hw[0]}x{hw[1]}")
    return arr


def normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 NHWC -> float32 NHWC, (x/255 - mean)/std."""
    x = images.astype(np.float32) / 255.0
    return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def model_input(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 NHWC images -> the float32 NCHW tensor data every torch model of the zoo takes."""
    return to_nchw(normalise(images, mean, std))


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype=np.int8) -> np.ndarray:
    info = np.iinfo(dtype)
    q = np.round(x / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)
