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
(the same flips, logit for logit, on the demo verifier), but for the two-op PReLUs below.

Each PReLU of the int8 file is x + relu(-(1 - a)*x) (toolchain.export.int8_prelu): a depthwise 1x1
convolution and an add. Calibrated independently, the add rescales both of its inputs onto its
own output grid, so every value of x, positive ones included, is rounded once more. Where it errs
less, its output and the branch instead take the input's grid step (`exact_prelu_adds`): the add
then sums integers exactly, and the branch's own rounding is the PReLU's only one.
"""

from __future__ import annotations

import hashlib

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.quantize.int8_options import Int8Options

# Ops whose output must share its input's quantisation (LiteRT kernels copy the int8 values).
_SAME_RANGE = ("RESHAPE", "PAD", "PADV2", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "MAX_POOL_2D", "SLICE",
               "STRIDED_SLICE", "GATHER", "SPLIT", "SPLIT_V", "DEPTH_TO_SPACE", "SPACE_TO_DEPTH")


def quantize_saved_model(saved_model_dir: str, inputs: np.ndarray, options: Int8Options | None = None,
                         float_plan=None, full_range_ops=None, per_user_ops=None, report: dict | None = None) -> bytes:
    """Full-integer .tflite (int8 input and output, per-channel weights) of a saved_model.
    `inputs`: normalised float32 NHWC calibration batch, one image per converter step.
    `float_plan` (toolchain.export.tflite_fallback.FloatPlan): the ops the file keeps in float.
    `full_range_ops`: given the calibrated flatbuffer, the output-tensor names of the ops of
    `options.full_range_layers` (toolchain.export.tflite_fallback.unit_tensors); needed when
    those are set. `per_user_ops`: likewise, the ops of a verifier's per-user layers, whose biases
    bias correction leaves alone. `report`, when given, gains what bias correction did
    ("bias_correction")."""
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
    calibrated, _ = exact_prelu_adds(calibrated, inputs)
    correct = _bias_correction(calibrated, inputs, per_user_ops) if options.bias_correction else None
    # The fallback judges its choices on corrected files, as they will be written.
    float_ops = float_plan.float_ops(calibrated, None if correct is None else lambda q: correct(q)[0]) \
        if float_plan is not None else []
    quantized = quantize_keeping_float(calibrated, float_ops)
    if correct is not None:
        quantized, corrected = correct(quantized)
        if report is not None:
            report["bias_correction"] = corrected
    return quantized


def _bias_correction(calibrated: bytes, inputs: np.ndarray, per_user_ops):
    """correct(int8 file) -> (corrected file, its report), measured on the converter's own int8
    graph (toolchain.export.tflite_bias_correction). Remembered by the file's bytes: the file
    the fallback chose was corrected when it was judged, and takes a minute on a backbone."""
    from toolchain.export.tflite_bias_correction import correct_tflite_biases

    skip = frozenset(per_user_ops(calibrated)) if per_user_ops is not None else frozenset()
    done: dict[bytes, tuple[bytes, dict]] = {}

    def correct(quantized: bytes) -> tuple[bytes, dict]:
        key = hashlib.sha256(quantized).digest()
        if key not in done:
            done[key] = correct_tflite_biases(quantized, calibrated, inputs, skip)
        return done[key]

    return correct


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


def exact_prelu_adds(calibrated: bytes, inputs: np.ndarray) -> tuple[bytes, list[dict]]:
    """The calibrated flatbuffer with each two-op PReLU's add made exact where that errs less
    (module docstring). `inputs`: calibration images as the file takes them (NHWC float).

    The pattern: ADD(x, t) where t = DEPTHWISE_CONV_2D(x) with a 1x1 filter and a fused ReLU, or
    where slopes exceed 1, t = sign(r) with r that ReLU branch and the sign a second depthwise 1x1
    (weights +-1). x's range width W sets the grid: r (or t) takes [0, W], and the sign's output
    and the add's output each a window of width W that holds their range and zero, so all share
    x's scale: the sign and the add then move integers without rounding. That spares the positive
    values their second rounding but puts the branch on x's coarser step, so each PReLU takes it
    only where it gives the smaller squared error against the float PReLU on the calibration
    images' activations (on a zero-centred x the calibrated grids can win). A PReLU whose branch
    or output does not fit in W keeps its calibrated ranges. The branch's ranges are the ones
    observed on `inputs`: the calibrated file records a negative minimum for the ReLU's output,
    which never takes one. Ops that copy values (reshape, pad) after a changed output take its new
    range, as LiteRT requires. Returns (bytes, one row per PReLU changed)."""
    from ai_edge_litert.interpreter import Interpreter

    from toolchain.export.tflite_flatbuffer import load_flatbuffer, op_name, pack_flatbuffer

    schema, model = load_flatbuffer(calibrated)
    graph = model.subgraphs[0]
    producer = {int(o): op for op in graph.operators for o in op.outputs if o >= 0}

    def span(i: int) -> tuple[float, float] | None:
        q = graph.tensors[i].quantization
        if q is None or q.min is None or len(q.min) != 1:
            return None
        return float(q.min[0]), float(q.max[0])

    def set_span(i: int, lo: float, hi: float) -> None:
        q = graph.tensors[i].quantization
        q.min, q.max = np.array([lo], np.float32), np.array([hi], np.float32)

    def pointwise_source(t: int) -> int | None:
        # The input of the depthwise 1x1 that writes t, if one does.
        op = producer.get(t)
        if op is None or op_name(schema, model, op) != "DEPTHWISE_CONV_2D":
            return None
        shape = graph.tensors[int(op.inputs[1])].shape
        ok = shape is not None and len(shape) == 4 and int(shape[1]) == int(shape[2]) == 1
        return int(op.inputs[0]) if ok else None

    def branch_of(x: int, t: int) -> tuple[int] | tuple[int, int] | None:
        # (t,) for t = relu(dw(x)); (r, t) for t = sign(r), r = relu(dw(x)); None otherwise.
        source = pointwise_source(t)
        if source == x:
            return (t,)
        return (source, t) if source is not None and pointwise_source(source) == x else None

    candidates = []  # (x, branch tensors, out)
    for op in graph.operators:
        if op_name(schema, model, op) != "ADD" or len(op.inputs) != 2:
            continue
        a, b, out = int(op.inputs[0]), int(op.inputs[1]), int(op.outputs[0])
        branch = branch_of(a, b)
        x, branch = (a, branch) if branch else (b, branch_of(b, a))
        if branch is None or out in graph.outputs or None in (span(x), span(out), *map(span, branch)):
            continue
        candidates.append((x, branch, out))
    if not candidates:
        return calibrated, []
    interpreter = Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    feed = interpreter.get_input_details()[0]["index"]
    seen: dict[int, list[np.ndarray]] = {i: [] for x, branch, _ in candidates for i in (x, branch[-1])}
    observed: dict[int, tuple[float, float]] = {i: (0.0, 0.0) for _, branch, _ in candidates for i in branch}
    for k in range(len(inputs)):
        interpreter.set_tensor(feed, inputs[k:k + 1].astype(np.float32))
        interpreter.invoke()
        for i, (lo, hi) in observed.items():
            value = interpreter.get_tensor(i)
            observed[i] = (min(lo, float(value.min())), max(hi, float(value.max())))
        if k < _PRELU_IMAGES:
            for i in seen:
                seen[i].append(interpreter.get_tensor(i).ravel().astype(np.float64))
    rows, changed = [], set()
    for x, branch, out in candidates:
        t = branch[-1]
        width = span(x)[1] - span(x)[0]
        windows = {i: (0.0, width) if observed[i][1] <= width else None for i in branch[:1]}  # the ReLU
        if len(branch) == 2:
            windows[t] = _window(*observed[t], width)
        windows[out] = _window(*span(out), width)
        if width <= 0 or None in windows.values():
            continue
        err_calibrated, err_exact = prelu_add_errors(np.concatenate(seen[x]), np.concatenate(seen[t]), span(x),
                                                     span(t), span(out), windows[t])
        if err_exact >= err_calibrated:
            continue
        for i, window in windows.items():
            set_span(i, *window)
        changed.add(out)
        name = graph.tensors[out].name
        rows.append({"tensor": name.decode() if isinstance(name, bytes) else str(name), "input": list(span(x)),
                     "window": list(windows[out]), "sign": len(branch) == 2,
                     "mse": [float(err_calibrated), float(err_exact)]})
    if not rows:
        return calibrated, rows
    _copy_ranges_down(schema, model, graph, changed)
    return pack_flatbuffer(model, len(calibrated)), rows


# Calibration images whose activations decide each PReLU's grids (a few hundred thousand values
# a tensor on the backbones).
_PRELU_IMAGES = 16


def prelu_add_errors(x: np.ndarray, t: np.ndarray, x_span, t_span, out_span, t_window) -> tuple[float, float]:
    """Mean squared error of a two-op PReLU's int8 output against the float x + t, with the
    calibrated ranges and with the exact add (the branch on `t_window`, as wide as x's range, and
    the output on x's step). x and t: float activations; the spans: (min, max) as calibrated."""
    xq, want = _fake_quant(x, *x_span), x + t
    calibrated = np.mean((_fake_quant(xq + _fake_quant(t, *t_span), *out_span) - want) ** 2)
    exact = np.mean((xq + _fake_quant(t, *t_window) - want) ** 2)
    return float(calibrated), float(exact)


def _window(lo: float, hi: float, width: float) -> tuple[float, float] | None:
    """A range of `width` that holds [lo, hi] and zero, from the bottom; None if none does."""
    bottom = min(lo, 0.0)
    if bottom + width < hi:  # the window's top must hold the largest value
        bottom = hi - width
    return (bottom, bottom + width) if bottom <= min(lo, 0.0) else None


def _fake_quant(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """`values` rounded to the int8 grid the converter makes of the range [lo, hi] (zero kept)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero = np.round(-128 - lo / scale)
    return (np.clip(np.round(values / scale) + zero, -128, 127) - zero) * scale


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
    from ai_edge_litert.interpreter import Interpreter

    from toolchain.export.tflite_flatbuffer import load_flatbuffer, op_name, pack_flatbuffer

    schema, model = load_flatbuffer(calibrated)
    graph = model.subgraphs[0]
    measured: list[int] = []  # outputs of ops that compute (copies keep their input's range)
    for op in graph.operators:
        if op_name(schema, model, op) in _SAME_RANGE and len(op.inputs) and op.inputs[0] >= 0:
            continue
        measured += [i for i in op.outputs if i >= 0 and _has_range(graph, i) and i not in graph.inputs]
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
    _copy_ranges_down(schema, model, graph)
    return pack_flatbuffer(model, len(calibrated))


def _has_range(graph, i: int) -> bool:
    q = graph.tensors[i].quantization
    return q is not None and q.min is not None and len(q.min) == 1


def _copy_ranges_down(schema, model, graph, sources: set[int] | None = None) -> None:
    """Give the outputs of ops that move values without changing them (`_SAME_RANGE`) their
    input's range, as LiteRT requires, in graph order so chains of them follow their source.
    With `sources`, only below those tensors (the set takes each output it sets)."""
    from toolchain.export.tflite_flatbuffer import op_name

    for op in graph.operators:
        if op_name(schema, model, op) not in _SAME_RANGE or not len(op.inputs) or op.inputs[0] < 0:
            continue
        source = int(op.inputs[0])
        if (sources is not None and source not in sources) or not _has_range(graph, source):
            continue
        src = graph.tensors[source].quantization
        for i in op.outputs:
            if i >= 0 and _has_range(graph, int(i)):
                graph.tensors[int(i)].quantization.min, graph.tensors[int(i)].quantization.max = \
                    src.min.copy(), src.max.copy()
                if sources is not None:
                    sources.add(int(i))
