"""Empirical bias correction of the TFLite converter's int8 graph (the `.tflite` twin of
toolchain.quantize.bias_correction; Nagel et al., ICCV 2019, section 4.2, empirical variant).

The converter's int8 graph has its own rounding errors, not PT2E's: carrying PT2E's corrected
biases into it made VarGFaceNet's `.tflite` worse (docs/int8-backbones.md). So the errors are
measured on the converter's own file. For every CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED op
with an int32 bias, the mean over the calibration images of (int8 output, dequantised - float
output) per channel is subtracted from the int32 bias, in units of its scale. The float outputs
are the same-named tensors of the converter's calibrated float graph.

The int8 output is clamped twice: by a fused ReLU or ReLU6, and by its own int8 range, which
`mse` and `percentile` calibration set inside the float outputs' extremes. Where it clamps, its
error is the clamp's, not the one the bias carries, and a bias moved to make up for clipped
tails would move every unclipped value with it. PT2E's correction measures the convolution's
output before its quantise step, so clipping never enters its mean; here the quantised output
is all LiteRT shows. So the mean is taken only where the float output lies inside both clamps,
clear of each by `CLAMP_MARGIN_STEPS` of the int8 output's step: there the int8 output is the
pre-activation's (the mask depends on the float output alone, not on the error). A channel with
fewer than `MIN_CLEAR_VALUES` such values keeps its bias. (Before, the activation clamps were
masked but the int8 range was not, and before that every ReLU-fused op was left alone, which in
the verifier is every layer of the trunk.)

LiteRT runs a file only whole, and XNNPACK hides a graph's inner tensors unless they are outputs.
So each layer is corrected in graph order, measured after the ones before it were corrected (a
correction never double-counts a shift an earlier layer already removed): the file is run on the
images with that layer's output added to the graph's outputs, in the runtime it ships to (LiteRT
with XNNPACK): one run over the images per layer (103 of the 185 in VarGFaceNet's file), and one
of the float graph beside it, whose outputs give the mask (VarGFaceNet, 64 images: 83 s, where
one float run for all layers took 28 s before the masks).
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


class _Run:
    """A file loaded once in LiteRT with its default (XNNPACK) delegate, run image by image."""

    def __init__(self, buf: bytes):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_content=buf)
        self.interpreter.allocate_tensors()
        self.feed = self.interpreter.get_input_details()[0]
        self.outs = self.interpreter.get_output_details()

    def __call__(self, image: np.ndarray, position: int) -> np.ndarray:
        """The output at `position` for one image as float64 (values, channels), dequantised
        if int8."""
        x = image[None]
        if self.feed["dtype"] == np.int8:
            scale, zero = self.feed["quantization"]
            x = np.clip(np.round(x / scale) + zero, -128, 127)
        self.interpreter.set_tensor(self.feed["index"], x.astype(self.feed["dtype"]))
        self.interpreter.invoke()
        d = self.outs[position]
        y = self.interpreter.get_tensor(d["index"]).astype(np.float64)
        if d["dtype"] == np.int8:
            scale, zero = d["quantization"]
            y = (y - zero) * scale
        return y.reshape(-1, y.shape[-1])


def _activation(op) -> int:
    """The op's fused ActivationFunctionType (0: none)."""
    return int(getattr(op.builtinOptions, "fusedActivationFunction", 0) or 0)


def _clear_window(op, out_tensor) -> tuple[float, float]:
    """The float values (low, high) between which the op's int8 output is clamped by neither its
    fused activation nor its int8 range, by `CLAMP_MARGIN_STEPS` of its step on each side."""
    act_low, act_high = _CLAMPS[_activation(op)]
    scale = float(out_tensor.quantization.scale[0])
    zero = int(out_tensor.quantization.zeroPoint[0])
    margin = CLAMP_MARGIN_STEPS * scale
    return max(act_low, (-128 - zero) * scale) + margin, min(act_high, (127 - zero) * scale) - margin


def _unclamped_shift(int8_run: _Run, int8_position: int, float_run: _Run, float_position: int,
                     inputs: np.ndarray, low: float, high: float) -> tuple[np.ndarray, float]:
    """(per channel, the mean of (int8 output - float output) where the float output lies in
    (low, high), 0 where fewer than MIN_CLEAR_VALUES do; the share of values outside)."""
    sums = counts = 0.0
    total = 0
    for image in inputs:
        q, f = int8_run(image, int8_position), float_run(image, float_position)
        clear = (f > low) & (f < high)
        sums = sums + np.where(clear, q - f, 0.0).sum(axis=0)
        counts = counts + clear.sum(axis=0)
        total += clear.size
    shift = np.where(counts >= MIN_CLEAR_VALUES, sums / np.maximum(counts, 1), 0.0)
    return shift, 1.0 - float(np.sum(counts)) / max(total, 1)


def _exact_product(weight, bias) -> bool:
    """Whether the op has one weight per output channel (a 1x1 depthwise conv, or onnx2tf's
    grouped CONV_2D form of one): on a per-channel scale that weight is exact in int8, so the
    op's own error is its output's rounding, which has no mean to correct. The PReLU branches of
    toolchain.export.int8_prelu are such ops (VarGFaceNet's file has 82, each with a fused ReLU):
    correcting them would only correct their input's error again."""
    return int(np.prod(weight.shape)) == int(bias.shape[0])


def correct_tflite_biases(quantized: bytes, calibrated: bytes, inputs: np.ndarray,
                          skip: frozenset[str] = frozenset()) -> tuple[bytes, dict]:
    """(`quantized` with its biases corrected, {"layers", "clamped_layers" (with a fused
    activation), "mean_abs_shift", "mean_clamped_share"}).
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
    targets = []  # (op, output tensor index, bias tensor, float tensor index), in graph order
    for op in sub.operators:
        if op_name(schema, model, op) not in _BIASED_OPS or len(op.inputs) < 3 or op.inputs[2] < 0:
            continue
        bias, out = sub.tensors[int(op.inputs[2])], sub.tensors[int(op.outputs[0])]
        if _activation(op) not in _CLAMPS or bias.type != schema.TensorType.INT32 \
                or out.type != schema.TensorType.INT8 or _name(out) not in float_index \
                or bias.quantization is None or _name(out) in skip or readers[bias.buffer] > 1 \
                or _exact_product(sub.tensors[int(op.inputs[1])], bias):
            continue
        targets.append((op, int(op.outputs[0]), bias, float_index[_name(out)]))
    if not targets:
        return quantized, {"layers": 0, "clamped_layers": 0, "mean_abs_shift": 0.0, "mean_clamped_share": 0.0}
    # The float graph is loaded once, every measured tensor an output: it runs beside each layer's
    # int8 run, image by image, as every layer's float outputs for every image would not fit.
    float_buf, float_positions = _with_outputs(float_model, [f for *_, f in targets], len(calibrated))
    float_run = _Run(float_buf)
    shifts, clamped_shares = [], []
    for (op, out, bias, _), float_position in zip(targets, float_positions):
        buf, (position,) = _with_outputs(model, [out], len(quantized))
        shift, clamped_share = _unclamped_shift(_Run(buf), position, float_run, float_position, inputs,
                                                *_clear_window(op, sub.tensors[out]))
        data = np.frombuffer(bytes(model.buffers[bias.buffer].data), "<i4").astype(np.int64)
        steps = np.round(shift / np.asarray(bias.quantization.scale, np.float64)).astype(np.int64)
        model.buffers[bias.buffer].data = np.frombuffer(
            np.clip(data - steps, -2**31, 2**31 - 1).astype("<i4").tobytes(), np.uint8)
        shifts.append(np.abs(shift))
        clamped_shares.append(clamped_share)
    return pack_flatbuffer(model, len(quantized)), {
        "layers": len(targets),
        "clamped_layers": sum(_activation(op) != 0 for op, *_ in targets),
        "mean_abs_shift": float(np.mean(np.concatenate(shifts))),
        # Each layer's share of values left out as clamped (activation, int8 range or margin), averaged.
        "mean_clamped_share": float(np.mean(clamped_shares))}
