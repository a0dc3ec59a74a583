"""The LiteRT interpreter (ai_edge_litert; the renamed tflite-runtime) with its XNNPACK delegate."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.runtime.base import InputInfo, Runner
from toolchain.runtime.metadata import read_embedded_metadata
from toolchain.runtime.preprocess import dequantize, normalise, quantize, to_nchw


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

    def _run_batch(self, images: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.inp["index"], self._input(images))
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.out["index"])
        if y.dtype in (np.int8, np.uint8):
            return dequantize(y, self.out_scale, self.out_zp)
        return y.astype(np.float32)

    def _timed_call(self, image: np.ndarray):
        self.interpreter.set_tensor(self.inp["index"], self._input(image))
        return self.interpreter.invoke
