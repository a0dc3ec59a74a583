"""The LiteRT interpreter (ai_edge_litert; the renamed tflite-runtime) with its XNNPACK delegate.

In-runtime latency: the Python package exposes no profiler, so the time of `invoke()` (inputs set
beforehand) is taken less the time of `invoke()` on a one-op model (a RELU of four floats): what
is left is the graph's own work inside the interpreter.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.formats import check_identifier
from toolchain.runtime.base import InputInfo, Runner, latency_record, median_ms
from toolchain.runtime.metadata import read_embedded_metadata
from toolchain.runtime.preprocess import check_images, dequantize, normalise, quantize, to_nchw


def one_op_tflite() -> bytes:
    """A valid .tflite with one RELU on a float32 (1, 4) tensor, written with LiteRT's own schema."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT()
    model.version = 3
    model.buffers = [schema.BufferT() for _ in range(3)]  # buffer 0 is the empty sentinel
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.RELU
    code.version = 1
    model.operatorCodes = [code]
    graph = schema.SubGraphT()
    graph.tensors = []
    for i, name in enumerate(("x", "y")):
        t = schema.TensorT()
        t.shape, t.type, t.buffer, t.name = [1, 4], schema.TensorType.FLOAT32, i + 1, name
        graph.tensors.append(t)
    graph.inputs, graph.outputs = [0], [1]
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0], [1]
    graph.operators = [op]
    model.subgraphs = [graph]
    builder = flatbuffers.Builder(256)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


@functools.lru_cache(maxsize=1)
def invoke_overhead_ms(repeats: int = 2000) -> float:
    """Median ms of `invoke()` on the one-op model: the Python-call and dispatch cost."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=one_op_tflite(), num_threads=1)
    interpreter.allocate_tensors()
    return median_ms(interpreter.invoke, repeats, warmup=50)


class LiteRTRunner(Runner):
    kind = "litert"

    def __init__(self, path: str | Path, metadata: dict | None = None, threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        path = Path(path)
        check_identifier(path)
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

    def runtime_latency(self, repeats: int = 50, warmup: int = 5, seed: int = 0) -> dict:
        wall = self.latency_ms(repeats, warmup, seed)
        return latency_record(wall, max(0.0, wall - invoke_overhead_ms()), "invoke() less a one-op model's invoke()")
