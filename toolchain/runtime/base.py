"""One interface over every runtime: uint8 NHWC images in, float32 (N, out_dim) out.

A runner hides the artifact's layout (NCHW or NHWC) and its quantisation (the input is
quantised with the input tensor's scale/zero-point, the output dequantised), so a caller
never handles either. `latency_ms` is the median wall time of one single-image inference,
single-threaded, after warm-up; `runtime_latency` separates the time spent inside the runtime
from the Python call around it (each runner says how it measures it).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from toolchain.runtime.preprocess import check_images


def median_ms(call, repeats: int = 50, warmup: int = 5) -> float:
    """Median wall milliseconds of `call()` over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def latency_record(wall_ms: float, runtime_ms: float | None, source: str | None) -> dict:
    return {"wall_ms": float(wall_ms), "runtime_ms": None if runtime_ms is None else float(runtime_ms),
            "overhead_ms": None if runtime_ms is None else float(wall_ms - runtime_ms), "source": source}


@dataclass
class InputInfo:
    """What the app must feed: the image size, normalisation and the artifact's own layout."""

    height: int = 112
    width: int = 112
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    layout: str = "NCHW"  # the artifact's tensor layout, hidden from callers of run()
    batch: int | None = 1  # None: any batch size
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_artifact(cls, path, shape: list[int], meta: dict) -> "InputInfo":
        """From an exported file's input shape and embedded metadata (toolchain.export)."""
        from toolchain.errors import ToolchainError

        if len(shape) != 4:
            raise ToolchainError(f"{path}: expected a 4-D image input, got {shape}")
        mi = meta.get("input") or {}
        # A 3-channel model fed NCHW data as NHWC gives wrong numbers with no error: decide the
        # layout from the metadata, else from where the 3 channels sit.
        layout = mi.get("layout") or ("NHWC" if shape[3] == 3 and shape[1] != 3 else "NCHW")
        h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
        if not mi.get("mean") or not mi.get("std"):
            raise ToolchainError(f"{path}: no toolchain metadata (mean/std); export it with `toolchain export`")
        return cls(height=h, width=w, mean=tuple(mi["mean"]), std=tuple(mi["std"]), layout=layout,
                   batch=shape[0])


class Runner(ABC):
    kind: str = "?"  # "torch", "executorch", "litert"

    def __init__(self, name: str, info: InputInfo, output: str, metadata: dict | None = None):
        self.name = name
        self.info = info
        self.output = output  # "embedding" or "logit"
        self.metadata = metadata or {}

    @property
    def threshold(self) -> float | None:
        t = self.metadata.get("threshold")
        return None if t is None else float(t)

    def run(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        images = check_images(images, (self.info.height, self.info.width), what=f"input of {self.name}")
        step = self.info.batch or batch_size
        outs = [self._run_batch(images[i:i + step]) for i in range(0, len(images), step)]
        out = np.concatenate(outs, axis=0).astype(np.float32)
        return out.reshape(len(images), -1)

    @abstractmethod
    def _run_batch(self, images: np.ndarray) -> np.ndarray:
        """Run at most `info.batch` checked images; return float32 (n, ...)."""

    def _single_thread(self):
        """Context manager forcing one thread while timing (runners override)."""
        import contextlib

        return contextlib.nullcontext()

    def latency_ms(self, repeats: int = 50, warmup: int = 5, seed: int = 0) -> float:
        """Median milliseconds of one single-image inference, one thread."""
        img = self._random_image(seed)
        with self._single_thread():
            return median_ms(self._timed_call(img), repeats, warmup)

    def _timed_call(self, image: np.ndarray):
        """A zero-argument callable doing one inference; by default the full run() path."""
        return lambda: self._run_batch(image)

    def runtime_latency(self, repeats: int = 50, warmup: int = 5, seed: int = 0) -> dict:
        """{"wall_ms": the timed Python call, "runtime_ms": the part inside the runtime (None
        where the runner cannot tell), "overhead_ms": their difference, "source": how runtime_ms
        was measured}; medians over `repeats` single-image inferences on one thread."""
        return latency_record(self.latency_ms(repeats, warmup, seed), None, None)

    def _random_image(self, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return rng.integers(0, 256, (1, self.info.height, self.info.width, 3), dtype=np.uint8)

    def describe(self) -> dict:
        return {"runner": self.kind, "name": self.name, "layout": self.info.layout,
                "input_hw": [self.info.height, self.info.width], "output": self.output}
