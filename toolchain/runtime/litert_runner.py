"""The LiteRT interpreter (ai_edge_litert; the renamed tflite-runtime) with its XNNPACK delegate."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.runtime.base import InputInfo, Runner
from toolchain.runtime.metadata import read_embedded_metadata
from toolchain.runtime.preprocess import check_images, dequantize, normalise, quantize, to_nchw


class LiteRTRunner(Runner):
    kind = "litert"

    def __init__(self, path: str | Path, metadata: dict | None = None, threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        path = Path(path)
        meta = metadata if metadata is not None else read_embedded_metadata(path)
        try:
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
            self.interpreter.allocate_tensors()
        except Exception as exc:  # noqa: BLE001
            raise ToolchainError(f"{path}: cannot load with LiteRT ({exc})".splitlines()[0]) from exc
        ins, outs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(ins) != 1 or len(outs) != 1:
            raise ToolchainError(f"{path}: expected one input and one output, got {len(ins)} and {len(outs)}")
        self.inp, self.out = ins[0], outs[0]
        info = InputInfo.from_artifact(path, [int(s) for s in self.inp["shape"]], meta)
        super().__init__(path.name, info, meta.get("output", "embedding"), meta)
        self.path = path
        self.in_scale, self.in_zp = self.inp["quantization"]
        self.out_scale, self.out_zp = self.out["quantization"]

    def _input(self, images: np.ndarray) -> np.ndarray:
        x = normalise(images, self.info.mean, self.info.std)
        if self.info.layout == "NCHW":
            x = to_nchw(x)
        dtype = self.inp["dtype"]
        if dtype in (np.int8, np.uint8):
            return quantize(x, self.in_scale, self.in_zp, dtype)
        return x.astype(dtype)

    def raw(self, images: np.ndarray) -> np.ndarray:
        """The output tensors as the runtime gives them (int8 for an int8 file), stacked."""
        images = check_images(images, (self.info.height, self.info.width), what=f"input of {self.name}")
        step = self.info.batch or 64
        return np.concatenate([self._raw_batch(images[i:i + step]) for i in range(0, len(images), step)])

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        if raw.dtype in (np.int8, np.uint8):
            return dequantize(raw, self.out_scale, self.out_zp)
        return raw.astype(np.float32)

    def _raw_batch(self, images: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.inp["index"], self._input(images))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.out["index"]).copy()

    def _run_batch(self, images: np.ndarray) -> np.ndarray:
        return self.dequantize(self._raw_batch(images))

    def _timed_call(self, image: np.ndarray):
        self.interpreter.set_tensor(self.inp["index"], self._input(image))
        return self.interpreter.invoke
