"""Empirical bias correction of the TFLite converter's int8 graph (the `.tflite` twin of
toolchain.quantize.bias_correction; Nagel et al., ICCV 2019, section 4.2, empirical variant).

The converter's int8 graph has its own rounding errors, not PT2E's: carrying PT2E's corrected
biases into it made VarGFaceNet's `.tflite` worse (docs/int8-backbones.md). So the errors are
measured on the converter's own file. For every CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED op
with an int32 bias and no fused activation (a fused clamp hides the pre-activation mean), the mean
over the calibration images of (int8 output, dequantised - float output) per channel is subtracted
from the int32 bias, in units of its scale. The float outputs are the same-named tensors of the
converter's calibrated float graph.

LiteRT runs a file only whole, and XNNPACK hides a graph's inner tensors unless they are outputs.
So each layer is corrected in graph order, measured after the ones before it were corrected (a
correction never double-counts a shift an earlier layer already removed): the file is run on the
images with that layer's output added to the graph's outputs, in the runtime it ships to (LiteRT
with XNNPACK): one run over the images per layer (VarGFaceNet's file has 103 such layers of 185).
"""

from __future__ import annotations

import numpy as np

from toolchain.export.tflite_flatbuffer import load_flatbuffer, op_name, pack_flatbuffer

_BIASED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _name(tensor) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def _with_outputs(model, extra: list[int], size_hint: int) -> tuple[bytes, list[int]]:
    """The packed file with tensors `extra` added to the graph's outputs, and the output
    position of each (the graph's own outputs come first, unchanged)."""
    sub = model.subgraphs[0]
    own = [int(i) for i in sub.outputs]
    added = [i for i in dict.fromkeys(extra) if i not in own]
    saved = sub.outputs
    sub.outputs = np.array(own + added, np.int32)
    try:
        buf = pack_flatbuffer(model, size_hint)
    finally:
        sub.outputs = saved
    order = own + added
    return buf, [order.index(i) for i in extra]


def _channel_means(buf: bytes, positions: list[int], inputs: np.ndarray) -> list[np.ndarray]:
    """Per-channel (last axis) mean of the outputs at `positions` over the images, dequantised
    if int8, run by LiteRT with its default (XNNPACK) delegate."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=buf)
    interpreter.allocate_tensors()
    feed = interpreter.get_input_details()[0]
    outs = [interpreter.get_output_details()[p] for p in positions]
    sums = [0.0] * len(outs)
    for k in range(len(inputs)):
        x = inputs[k:k + 1]
        if feed["dtype"] == np.int8:
            scale, zero = feed["quantization"]
            x = np.clip(np.round(x / scale) + zero, -128, 127)
        interpreter.set_tensor(feed["index"], x.astype(feed["dtype"]))
        interpreter.invoke()
        for j, d in enumerate(outs):
            y = interpreter.get_tensor(d["index"]).astype(np.float64)
            if d["dtype"] == np.int8:
                scale, zero = d["quantization"]
                y = (y - zero) * scale
            sums[j] = sums[j] + y.reshape(-1, y.shape[-1]).mean(axis=0)
    return [s / max(len(inputs), 1) for s in sums]


def correct_tflite_biases(quantized: bytes, calibrated: bytes, inputs: np.ndarray) -> tuple[bytes, dict]:
    """(`quantized` with its biases corrected, {"layers", "mean_abs_shift"}).
    `calibrated`: the converter's float graph the int8 one was made from (same tensor names);
    `inputs`: the normalised float32 NHWC calibration images."""
    schema, model = load_flatbuffer(quantized)
    sub = model.subgraphs[0]
    _, float_model = load_flatbuffer(calibrated)
    float_index = {_name(t): i for i, t in enumerate(float_model.subgraphs[0].tensors)}
    targets = []  # (output tensor index, bias tensor, float tensor index), in graph order
    for op in sub.operators:
        if op_name(schema, model, op) not in _BIASED_OPS:
            continue
        if len(op.inputs) < 3 or op.inputs[2] < 0 or getattr(op.builtinOptions, "fusedActivationFunction", 0):
            continue
        bias, out = sub.tensors[int(op.inputs[2])], sub.tensors[int(op.outputs[0])]
        if bias.type != schema.TensorType.INT32 or out.type != schema.TensorType.INT8 \
                or _name(out) not in float_index or bias.quantization is None:
            continue
        targets.append((int(op.outputs[0]), bias, float_index[_name(out)]))
    if not targets:
        return quantized, {"layers": 0, "mean_abs_shift": 0.0}
    float_buf, positions = _with_outputs(float_model, [f for _, _, f in targets], len(calibrated))
    float_means = _channel_means(float_buf, positions, inputs)
    shifts = []
    for (out, bias, _), float_mean in zip(targets, float_means):
        buf, (position,) = _with_outputs(model, [out], len(quantized))
        shift = _channel_means(buf, [position], inputs)[0] - float_mean
        data = np.frombuffer(bytes(model.buffers[bias.buffer].data), "<i4").astype(np.int64)
        steps = np.round(shift / np.asarray(bias.quantization.scale, np.float64)).astype(np.int64)
        model.buffers[bias.buffer].data = np.frombuffer(
            np.clip(data - steps, -2**31, 2**31 - 1).astype("<i4").tobytes(), np.uint8)
        shifts.append(np.abs(shift))
    return pack_flatbuffer(model, len(quantized)), {"layers": len(targets),
                                                    "mean_abs_shift": float(np.mean(np.concatenate(shifts)))}
