"""Torch eager: the float reference every artifact is compared with."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from toolchain.runtime.base import InputInfo, Runner
from toolchain.runtime.preprocess import model_input


class TorchRunner(Runner):
    kind = "torch"

    def __init__(self, model: nn.Module, name: str | None = None, metadata: dict | None = None):
        spec = getattr(model, "spec", None)
        c, h, w = spec.input_size if spec is not None else (3, 112, 112)
        info = InputInfo(height=h, width=w,
                         mean=tuple(spec.mean) if spec else (0.5, 0.5, 0.5),
                         std=tuple(spec.std) if spec else (0.5, 0.5, 0.5),
                         layout="NCHW", batch=None)
        super().__init__(name or (spec.name if spec else type(model).__name__), info,
                         spec.output if spec else "embedding", metadata)
        self.model = model.eval()

    def _tensor(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(model_input(images, self.info.mean, self.info.std))

    def _run_batch(self, images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(self._tensor(images)).float().numpy()

    @contextlib.contextmanager
    def _single_thread(self):
        prior = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(prior)

    def _timed_call(self, image: np.ndarray):
        x = self._tensor(image)

        def call():
            with torch.inference_mode():
                self.model(x)

        return call
