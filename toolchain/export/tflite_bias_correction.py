"""Empirical bias correction of the TFLite converter's int8 graph (the `.tflite` twin of
toolchain.quantize.bias_correction; Nagel et al., ICCV 2019, section 4.2, empirical variant).

The converter's int8 graph has its own rounding errors, not PT2E's: carrying PT2E's corrected
biases into it made VarGFaceNet's `.tflite` worse (docs/int8-backbones.md). So the errors are
measured on the converter's own file. For every CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED op
with an int32 bias, the mean over the calibration images of (int8 output, dequantised - float
output) per channel is subtracted from the int32 bias, in units of its scale. The float outputs
are the same-named tensors of the converter's calibrated float graph.

A fused ReLU or ReLU6 clamps the output, which hides the pre-activation's mean where it clamps.
So for those ops the mean is taken only where the float output is clear of the clamp by
`CLAMP_MARGIN_STEPS` of the int8 output's step: there the int8 output is the pre-activation's,
its error the one the bias carries (the mask depends on the float output alone, not on the
error). A channel with fewer than `MIN_CLEAR_VALUES` such values keeps its bias. Before, every
ReLU-fused op was left alone, which in the verifier is every layer of the trunk.

LiteRT runs a file only whole, and XNNPACK hides a graph's inner tensors unless they are outputs.
So each layer is corrected in graph order, measured after the ones before it were corrected (a
correction never double-counts a shift an earlier layer already removed): the file is run on the
images with that layer's output added to the graph's outputs, in the runtime it ships to (LiteRT
with XNNPACK): one run over the images per layer (103 of the 185 in VarGFaceNet's file), and for
a clamped layer one of the float graph beside it, whose outputs give the mask.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from toolchain.export.tflite_flatbuffer import load_flatbuffer, op_name, pack_flatbuffer

_BIASED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
# Values a fused activation clamps to, by its ActivationFunctionType: RELU 1, RELU6 3. Ops with
# another fused activation (tanh, ...) are left alone.
_CLAMPS = {0: (-np.inf, np.inf), 1: (0.0, np.inf), 3: (0.0, 6.0)}
# How far (in int8 output steps) a float value must be from a clamp for the int8 value beside it
# to be unclamped, for an int8 pre-activation that errs by less than that.
CLAMP_MARGIN_STEPS = 4
MIN_CLEAR_VALUES = 16  # fewer unclamped values in a channel than this: its bias is left as it is


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


def _outputs_per_image(buf: bytes, positions: list[int], inputs: np.ndarray):
    """For each image, the outputs at `positions` as float64 arrays of (values, channels),
    dequantised if int8, run by LiteRT with its default (XNNPACK) delegate."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=buf)
    interpreter.allocate_tensors()
    feed = interpreter.get_input_details()[0]
    outs = [interpreter.get_output_details()[p] for p in positions]
    for k in range(len(inputs)):
        x = inputs[k:k + 1]
        if feed["dtype"] == np.int8:
            scale, zero = feed["quantization"]
            x = np.clip(np.round(x / scale) + zero, -128, 127)
        interpreter.set_tensor(feed["index"], x.astype(feed["dtype"]))
        interpreter.invoke()
        values = []
        for d in outs:
            y = interpreter.get_tensor(d["index"]).astype(np.float64)
            if d["dtype"] == np.int8:
                scale, zero = d["quantization"]
                y = (y - zero) * scale
            values.append(y.reshape(-1, y.shape[-1]))
        yield values


def _channel_means(buf: bytes, positions: list[int], inputs: np.ndarray) -> list[np.ndarray]:
    """Per-channel (last axis) mean of the outputs at `positions` over the images."""
    sums = [0.0] * len(positions)
    for values in _outputs_per_image(buf, positions, inputs):
        sums = [s + y.mean(axis=0) for s, y in zip(sums, values)]
    return [s / max(len(inputs), 1) for s in sums]


def _unclamped_shift(int8_run: tuple[bytes, int], float_run: tuple[bytes, int], inputs: np.ndarray,
                     low: float, high: float) -> np.ndarray:
    """Per channel, the mean of (int8 output - float output) where the float output lies in
    (low, high); 0 where fewer than MIN_CLEAR_VALUES do."""
    sums = counts = 0.0
    for (q,), (f,) in zip(_outputs_per_image(int8_run[0], [int8_run[1]], inputs),
                          _outputs_per_image(float_run[0], [float_run[1]], inputs)):
        clear = (f > low) & (f < high)
        sums = sums + np.where(clear, q - f, 0.0).sum(axis=0)
        counts = counts + clear.sum(axis=0)
    return np.where(counts >= MIN_CLEAR_VALUES, sums / np.maximum(counts, 1), 0.0)


def _exact_product(weight, bias) -> bool:
    """Whether the op has one weight per output channel (a 1x1 depthwise conv, or onnx2tf's
    grouped CONV_2D form of one): on a per-channel scale that weight is exact in int8, so the
    op's own error is its output's rounding, which has no mean to correct. The PReLU branches of
    toolchain.export.int8_prelu are such ops (VarGFaceNet's file has 82, each with a fused ReLU):
    correcting them would only correct their input's error again."""
    return int(np.prod(weight.shape)) == int(bias.shape[0])


def correct_tflite_biases(quantized: bytes, calibrated: bytes, inputs: np.ndarray,
                          skip: frozenset[str] = frozenset()) -> tuple[bytes, dict]:
    """(`quantized` with its biases corrected, {"layers", "clamped_layers", "mean_abs_shift"}).
    `calibrated`: the converter's float graph the int8 one was made from (same tensor names);
    `inputs`: the normalised float32 NHWC calibration images; `skip`: output-tensor names of ops
    whose bias keeps its value (a verifier's per-user layers, as in
    toolchain.quantize.bias_correction)."""
    schema, model = load_flatbuffer(quantized)
    sub = model.subgraphs[0]
    _, float_model = load_flatbuffer(calibrated)
    float_index = {_name(t): i for i, t in enumerate(float_model.subgraphs[0].tensors)}
    # A bias buffer several ops read is left as it is: correcting one op would move the others.
    # The converter shares one zero buffer among bias-free layers of a width.
    readers = Counter(t.buffer for t in sub.tensors)
    targets = []  # (output tensor index, bias tensor, float tensor index, clamp), in graph order
    for op in sub.operators:
        if op_name(schema, model, op) not in _BIASED_OPS or len(op.inputs) < 3 or op.inputs[2] < 0:
            continue
        clamp = _CLAMPS.get(int(getattr(op.builtinOptions, "fusedActivationFunction", 0) or 0))
        bias, out = sub.tensors[int(op.inputs[2])], sub.tensors[int(op.outputs[0])]
        if clamp is None or bias.type != schema.TensorType.INT32 or out.type != schema.TensorType.INT8 \
                or _name(out) not in float_index or bias.quantization is None or _name(out) in skip \
                or readers[bias.buffer] > 1 or _exact_product(sub.tensors[int(op.inputs[1])], bias):
            continue
        targets.append((int(op.outputs[0]), bias, float_index[_name(out)], clamp))
    if not targets:
        return quantized, {"layers": 0, "clamped_layers": 0, "mean_abs_shift": 0.0}
    unclamped = [f for _, _, f, clamp in targets if clamp == _CLAMPS[0]]
    float_buf, positions = _with_outputs(float_model, unclamped, len(calibrated))
    float_means = dict(zip(unclamped, _channel_means(float_buf, positions, inputs)))
    shifts = []
    for out, bias, float_tensor, (low, high) in targets:
        buf, (position,) = _with_outputs(model, [out], len(quantized))
        if float_tensor in float_means:
            shift = _channel_means(buf, [position], inputs)[0] - float_means[float_tensor]
        else:
            margin = CLAMP_MARGIN_STEPS * float(sub.tensors[out].quantization.scale[0])
            layer_float, (float_position,) = _with_outputs(float_model, [float_tensor], len(calibrated))
            shift = _unclamped_shift((buf, position), (layer_float, float_position), inputs,
                                     low + margin, high - margin)
        data = np.frombuffer(bytes(model.buffers[bias.buffer].data), "<i4").astype(np.int64)
        steps = np.round(shift / np.asarray(bias.quantization.scale, np.float64)).astype(np.int64)
        model.buffers[bias.buffer].data = np.frombuffer(
            np.clip(data - steps, -2**31, 2**31 - 1).astype("<i4").tobytes(), np.uint8)
        shifts.append(np.abs(shift))
    return pack_flatbuffer(model, len(quantized)), {
        "layers": len(targets), "clamped_layers": len(targets) - len(unclamped),
        "mean_abs_shift": float(np.mean(np.concatenate(shifts)))}
