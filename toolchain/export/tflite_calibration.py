"""int8 TFLite from onnx2tf's saved_model, with activation ranges chosen by the recipe's method.

The TFLite converter calibrates min-max only. It does it in two steps that it exposes: with
`_experimental_calibrate_only` it returns the float model with each activation's observed min and
max recorded in the flatbuffer, and `mlir_quantize` turns such a model into the int8 one. Between
the two, each range is replaced by the one the recipe's `export.int8.calibration` picks, computed
by the same torchao observers as the PT2E path (toolchain.quantize.int8_options), on the same
calibration images, from the activations the calibrated model computes. Left as calibrated: the
graph input (its range is the pixel grid, toolchain.quantize.exact_input) and outputs of ops that
move values without changing them (reshape, pad, transpose, ...), which take their input's range
because LiteRT requires it. Tensors written by the modules of `export.int8.full_range_layers`
take their observed minimum and maximum instead (as PT2E's MinMax observers do for the `.pte`).

With `minmax` the ranges are the converter's own, and the file equals a one-step conversion's
(the same flips, logit for logit, on the demo verifier).
"""

from __future__ import annotations

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.quantize.int8_options import Int8Options

# Ops whose output must share its input's quantisation (LiteRT kernels copy the int8 values).
_SAME_RANGE = ("RESHAPE", "PAD", "PADV2", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "MAX_POOL_2D", "SLICE",
               "STRIDED_SLICE", "GATHER", "SPLIT", "SPLIT_V", "DEPTH_TO_SPACE", "SPACE_TO_DEPTH")


def quantize_saved_model(saved_model_dir: str, inputs: np.ndarray, options: Int8Options | None = None,
                         float_plan=None, full_range_ops=None) -> bytes:
    """Full-integer .tflite (int8 input and output, per-channel weights) of a saved_model.
    `inputs`: normalised float32 NHWC calibration batch, one image per converter step.
    `float_plan` (toolchain.export.tflite_fallback.FloatPlan): the ops the file keeps in float.
    `full_range_ops`: given the calibrated flatbuffer, the output-tensor names of the ops of
    `options.full_range_layers` (toolchain.export.tflite_fallback.unit_tensors); needed when
    those are set."""
    import tensorflow as tf

    from toolchain.export.tflite_fallback import quantize_keeping_float

    options = Int8Options.from_any(options)

    def representative():
        for i in range(len(inputs)):
            yield [tf.constant(inputs[i:i + 1])]

    # onnx2tf's own full-integer settings (onnx2tf.py, "Full Integer Quantization").
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.SELECT_TF_OPS]
    converter.representative_dataset = representative
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    converter._experimental_calibrate_only = True
    calibrated = converter.convert()
    if options.calibration != "minmax":
        full_range = set()
        if options.full_range_layers:
            if full_range_ops is None:
                raise ToolchainError("export.int8.full_range_layers: this .tflite path cannot place the modules")
            full_range = set(full_range_ops(calibrated))
        calibrated = set_ranges(calibrated, inputs, options, full_range)
    calibrated, _ = narrow_sigmoid_inputs(calibrated)
    float_ops = float_plan.float_ops(calibrated) if float_plan is not None else []
    quantized = quantize_keeping_float(calibrated, float_ops)
    if options.bias_correction:  # measured on the converter's own int8 graph (toolchain.export.tflite_bias_correction)
        from toolchain.export.tflite_bias_correction import correct_tflite_biases

        quantized, _ = correct_tflite_biases(quantized, calibrated, inputs)
    return quantized


def narrow_sigmoid_inputs(calibrated: bytes) -> tuple[bytes, list[dict]]:
    """The calibrated flatbuffer with the ranges of tensors read only by LOGISTIC ops, or by a
    LOGISTIC and the MUL of the tensor with it (a SiLU), clipped where the int8 LOGISTIC writes
    the same level anyway (toolchain.quantize.saturation). Returns (bytes, one row per tensor)."""
    from toolchain.export.tflite_flatbuffer import load_flatbuffer, op_name
    from toolchain.quantize.saturation import narrowed_range

    schema, model = load_flatbuffer(calibrated)
    graph = model.subgraphs[0]
    readers: dict[int, list] = {}
    for op in graph.operators:
        for i in op.inputs:
            if i >= 0:
                readers.setdefault(int(i), []).append(op)
    # A reshaped tensor keeps its source's range (LiteRT requires it): left as it is.
    copied = {int(o) for op in graph.operators if op_name(schema, model, op) in _SAME_RANGE for o in op.outputs}
    logistic_of = {int(op.outputs[0]): int(op.inputs[0]) for op in graph.operators
                   if op_name(schema, model, op) == "LOGISTIC"}
    rows = []
    for i, ops in readers.items():
        q = graph.tensors[i].quantization
        if i in graph.outputs or i in copied or q is None or q.min is None or len(q.min) != 1:
            continue
        names = [op_name(schema, model, op) for op in ops]
        sigmoids = [op for op, n in zip(ops, names) if n == "LOGISTIC"]
        if not sigmoids:
            continue
        if len(sigmoids) == len(ops):
            kind = "sigmoid"
        elif len(ops) == 2 and sorted(names) == ["LOGISTIC", "MUL"] and \
                sorted(logistic_of.get(int(j)) == i for j in ops[names.index("MUL")].inputs) == [False, True]:
            kind = "silu"
        else:
            continue
        lo, hi = float(q.min[0]), float(q.max[0])
        new_lo, new_hi = narrowed_range(lo, hi, kind)
        if new_lo > lo or new_hi < hi:
            q.min, q.max = np.array([new_lo], np.float32), np.array([new_hi], np.float32)
            rows.append({"tensor": graph.tensors[i].name.decode() if isinstance(graph.tensors[i].name, bytes)
                         else str(graph.tensors[i].name), "readers": kind, "range": [lo, hi],
                         "narrowed": [new_lo, new_hi]})
    if not rows:
        return calibrated, rows
    from toolchain.export.tflite_flatbuffer import pack_flatbuffer

    return pack_flatbuffer(model, len(calibrated)), rows


def _observer(options: Int8Options):
    from torchao.quantization.pt2e.observer import HistogramObserver

    from toolchain.quantize.int8_options import percentile_observer

    if options.calibration == "percentile":
        return percentile_observer()(percentile=float(options.percentile))
    return HistogramObserver()


def set_ranges(calibrated: bytes, inputs: np.ndarray, options: Int8Options, full_range=frozenset()) -> bytes:
    """The calibrated flatbuffer with every computed activation's min/max chosen by `options`;
    tensors named in `full_range` take their observed min/max."""
    import torch
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter

    from toolchain.export.tflite_flatbuffer import pack_flatbuffer

    model = schema.ModelT.InitFromPackedBuf(calibrated, 0)
    graph = model.subgraphs[0]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}

    def op_name(op) -> str:
        code = model.operatorCodes[op.opcodeIndex]
        return names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?")

    def has_range(i: int) -> bool:
        q = graph.tensors[i].quantization
        return q is not None and q.min is not None and len(q.min) == 1

    copy_from: dict[int, int] = {}  # output tensor -> the input whose range it keeps
    measured: list[int] = []
    for op in graph.operators:
        outs = [i for i in op.outputs if i >= 0 and has_range(i)]
        if op_name(op) in _SAME_RANGE and len(op.inputs) and op.inputs[0] >= 0:
            copy_from.update({i: int(op.inputs[0]) for i in outs})
        else:
            measured += [i for i in outs if i not in graph.inputs]
    if not measured:
        return calibrated
    interpreter = Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    feed = interpreter.get_input_details()[0]["index"]
    observers = {i: _observer(options) for i in measured}
    for k in range(len(inputs)):
        interpreter.set_tensor(feed, inputs[k:k + 1].astype(np.float32))
        interpreter.invoke()
        for i, obs in observers.items():
            obs(torch.from_numpy(np.ascontiguousarray(interpreter.get_tensor(i), dtype=np.float32)))
    for i, obs in observers.items():
        name = graph.tensors[i].name
        name = name.decode() if isinstance(name, bytes) else str(name)
        lo, hi = (float(v) for v in ((obs.min_val, obs.max_val) if name in full_range
                                      else obs._non_linear_param_search()))
        q = graph.tensors[i].quantization
        # The converter's ranges always hold zero (an int8 zero-point must exist).
        q.min, q.max = np.array([min(lo, 0.0)], np.float32), np.array([max(hi, 0.0)], np.float32)
    for op in graph.operators:  # in graph order, so chains of plumbing follow their source
        for i in op.outputs:
            if i in copy_from and has_range(copy_from[i]):
                src = graph.tensors[copy_from[i]].quantization
                graph.tensors[i].quantization.min, graph.tensors[i].quantization.max = src.min.copy(), src.max.copy()
    return pack_flatbuffer(model, len(calibrated))
