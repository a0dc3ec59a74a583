"""TFLite export: torch -> ONNX -> onnx2tf (default), or litert-torch (the second backend).

onnx2tf runs fully offline here because of two precautions (shared/STACK.md):
- it runs in a temporary working folder that already holds the calibration sample it would
  otherwise download (`calibration_image_sample_data_20x128x128x3_float32.npy`);
- the environment's bin/ is put first on PATH so its `onnxsim` command is found.
onnx2tf writes the float file and a saved_model; the int8 file is quantised from that saved_model
by the TFLite converter with our calibration images, normalised with the model's own mean/std,
and ranges chosen by the recipe (toolchain.export.tflite_calibration). Only the final files come
out of the temporary folder; nothing else is kept.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolchain.errors import ToolchainError
from toolchain.export.tflite_flatbuffer import load_flatbuffer, op_name, pack_flatbuffer

_SAMPLE_NAME = "calibration_image_sample_data_20x128x128x3_float32.npy"
LITERT_TORCH_VERSION = "0.10.0"


@contextlib.contextmanager
def _in_dir(path: Path):
    prev = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(prev)


@contextlib.contextmanager
def _env_bin_on_path():
    prev = os.environ.get("PATH", "")
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + prev
    try:
        yield
    finally:
        os.environ["PATH"] = prev


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        torch.onnx.export(model.eval(), (example,), str(path), input_names=["input"], output_names=["output"],
                          opset_version=17, dynamo=False)
    except Exception as exc:  # noqa: BLE001 - the TorchScript exporter is deprecated: try dynamo
        try:
            torch.onnx.export(model.eval(), (example,), str(path), input_names=["input"],
                              output_names=["output"], dynamo=True)
        except Exception as exc2:  # noqa: BLE001
            raise ToolchainError(f"ONNX export failed: {exc} / {exc2}".splitlines()[0]) from exc2


def anchor_input_range(calibration: np.ndarray) -> np.ndarray:
    """A copy whose first image has one black and one white pixel in its top-left corner.

    The TFLite converter takes the int8 input range from the calibration data's min and max;
    with pixels 0 and 255 present, (p - 128)/128 spans exactly [-1, 127/128] and the input is
    quantised with scale 1/128 and zero-point 0 (toolchain.quantize.exact_input)."""
    anchored = calibration.copy()
    anchored[0, 0, 0, :] = 0
    anchored[0, 0, 1, :] = 255
    return anchored


def export_tflite_onnx2tf(model: nn.Module, example: torch.Tensor, precisions: list[str],
                          calibration: np.ndarray | None, mean, std, verbose: bool = False,
                          exact_input: bool = False, int8=None, float_plan=None,
                          full_range_ops=None, per_user_ops=None, report: dict | None = None) -> dict[str, bytes]:
    """Return {"fp32": bytes, "int8": bytes} for the precisions asked (int8 = full integer, int8 I/O).
    onnx2tf writes the float file and its saved_model; the int8 file comes from that saved_model
    through the TFLite converter with ranges set by `int8.calibration`
    (toolchain.export.tflite_calibration). `exact_input`: anchor the calibration's input range
    to the full pixel range. `float_plan` (toolchain.export.tflite_fallback.FloatPlan): what the
    int8 file keeps in float (its `report` says what it kept). `full_range_ops`, `per_user_ops`,
    `report`: see toolchain.export.tflite_calibration.quantize_saved_model."""
    import onnx2tf

    from toolchain.export.tflite_calibration import quantize_saved_model

    want_int8 = "int8" in precisions
    with tempfile.TemporaryDirectory(prefix="toolchain-onnx2tf-") as tmp:
        work = Path(tmp)
        onnx_path = work / "model.onnx"
        export_onnx(model, example, onnx_path)
        # Present in the working folder, so onnx2tf never tries to download it.
        np.save(work / _SAMPLE_NAME, np.zeros((20, 128, 128, 3), np.float32))
        out = work / "out"
        sink = io.StringIO()
        try:
            # Signature defs on: onnx2tf then writes its saved_model through a Keras export
            # archive. The plain tf.saved_model.save it uses otherwise rejects the root scope of
            # TorchScript's ONNX names ("/features/features.15/dw/...", SeesawFaceNet) and exits.
            with _in_dir(work), _env_bin_on_path(), contextlib.redirect_stdout(sys.stdout if verbose else sink):
                onnx2tf.convert(input_onnx_file_path=str(onnx_path), output_folder_path=str(out),
                                non_verbose=not verbose, output_signaturedefs=True)
        except BaseException as exc:  # noqa: BLE001 - onnx2tf may sys.exit on errors
            tail = " | ".join(sink.getvalue().strip().splitlines()[-3:])
            raise ToolchainError(f"onnx2tf conversion failed: {type(exc).__name__}: {exc} {tail}".strip()) from exc
        result = {}
        if "fp32" in precisions:
            path = out / "model_float32.tflite"
            if not path.is_file():
                raise ToolchainError(f"onnx2tf did not write {path.name}")
            result["fp32"] = canonical_tensor_names(path.read_bytes())
        if want_int8:
            if exact_input:
                calibration = anchor_input_range(calibration)
            m = np.asarray(mean, np.float32).reshape(1, 1, 1, -1)
            s = np.asarray(std, np.float32).reshape(1, 1, 1, -1)
            inputs = ((calibration.astype(np.float32) / 255.0 - m) / s).astype(np.float32)
            try:
                with contextlib.redirect_stdout(sys.stdout if verbose else sink):
                    result["int8"] = canonical_tensor_names(quantize_saved_model(str(out), inputs, int8, float_plan,
                                                                                 full_range_ops, per_user_ops,
                                                                                 report))
            except ToolchainError:
                raise
            except Exception as exc:  # noqa: BLE001 - the converter's errors are long C++ traces
                raise ToolchainError(f"TFLite int8 conversion failed: {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        return result


def export_tflite_litert_torch(model: nn.Module, example: torch.Tensor, precision: str,
                               calibration: np.ndarray | None, mean, std,
                               input_qparams: tuple[float, int] | None = None,
                               output_threshold: float | None = None, int8=None) -> bytes:
    """litert-torch: direct torch -> TFLite; int8 through its own PT2E quantizer (int8 I/O,
    per-channel weights, histogram-calibrated activations).

    The same int8 measures as the ExecuTorch path (toolchain.quantize.pt2e): the pooled features
    get their own range, `input_qparams` pins the input quantisation and `output_threshold` puts
    a verifier's threshold on an output bin edge. Its model keeps an NCHW input (a TRANSPOSE
    follows it).
    """
    try:
        import litert_torch
    except ImportError as exc:
        raise ToolchainError(f"litert-torch is not installed (pip install litert-torch=={LITERT_TORCH_VERSION}, "
                             "see the README), or use the onnx2tf backend") from exc

    model = model.eval()
    with tempfile.TemporaryDirectory(prefix="toolchain-litert-") as tmp:
        path = Path(tmp) / "model.tflite"
        sink = io.StringIO()
        try:
            # litert-torch prints a progress line per conversion pass; keep them out of the CLI output.
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                if precision == "int8":
                    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
                    from litert_torch.quantize.quant_config import QuantConfig

                    from toolchain.quantize.int8_options import Int8Options, with_calibration
                    from toolchain.quantize.pt2e import _own_pool_range, quantize_pt2e

                    int8 = Int8Options.from_any(int8)
                    quantizer = _own_pool_range(PT2EQuantizer)().set_global(with_calibration(
                        get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False), int8))
                    quantizer.full_range_layers = tuple(int8.full_range_layers)
                    converted = quantize_pt2e(model, example, calibration, mean, std, quantizer,
                                              input_qparams=input_qparams, output_threshold=output_threshold,
                                              fold_quantize=False, bias_correction=int8.bias_correction)
                    converted.training = False  # exported from eval(); the flag only feeds litert's warning
                    edge = litert_torch.convert(converted, (example,),
                                                quant_config=QuantConfig(pt2e_quantizer=quantizer))
                else:
                    edge = litert_torch.convert(model, (example,))
                edge.export(str(path))
        except ToolchainError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ToolchainError(f"litert-torch conversion failed: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
        return path.read_bytes()


# Keras numbers layers per process (model_1/..., tf.math.add_13): a second conversion in one
# process names the same tensors differently. Stripping the counters makes a conversion's bytes
# depend on the model only, so a full export equals a file written from a template.
_KERAS_COUNTER = re.compile(r"(?<=[A-Za-z])_\d+(?=[/;:]|$)")


def canonical_tensor_names(buf: bytes) -> bytes:
    """The flatbuffer with Keras's per-process layer counters removed from tensor names."""
    _, model = load_flatbuffer(buf)
    for sub in model.subgraphs:
        for t in sub.tensors:
            if t.name is not None:
                name = t.name.decode() if isinstance(t.name, bytes) else t.name
                t.name = _KERAS_COUNTER.sub("", name)
    return pack_flatbuffer(model, len(buf))


def _set_quant(tensor, scales, zero_points) -> None:
    q = tensor.quantization
    q.scale = [float(x) for x in np.atleast_1d(scales).astype(np.float32)]
    q.zeroPoint = [int(x) for x in np.atleast_1d(zero_points)]
    q.min = q.max = None  # calibration ranges the converter may keep: they would be the previous user's


def write_head_quant_tflite(buf: bytes, compute_head) -> tuple[bytes, dict]:
    """Write a verifier's per-user head quantisation (`compute_head(feature_scale)`, see
    toolchain.quantize.head) into an int8 .tflite: the last FULLY_CONNECTED ops are the head's
    layers, in order. Their int8 weights, int32 biases, the scales of both and their output
    quantisation take the values computed. Returns (bytes, {"head", "feature_scale"})."""
    schema, model = load_flatbuffer(buf)
    sub = model.subgraphs[0]
    fcs = [op for op in sub.operators if op_name(schema, model, op) == "FULLY_CONNECTED"]
    if len(fcs) < 2:
        raise ToolchainError(f"int8 .tflite: expected the head's FULLY_CONNECTED layers, found {len(fcs)}")
    feature = sub.tensors[int(fcs[-2].inputs[0])]
    feature_scale = float(feature.quantization.scale[0])
    head = compute_head(feature_scale)
    ops = fcs[-len(head.layers):]
    for q, op in zip(head.layers, ops):
        w, b, y = (sub.tensors[int(i)] for i in (op.inputs[1], op.inputs[2], op.outputs[0]))
        if tuple(w.shape) != q.weight_q.shape or int(b.shape[0]) != len(q.bias_q):
            raise ToolchainError(f"int8 .tflite: {q.name} has shape {tuple(w.shape)}, the model {q.weight_q.shape}")
        model.buffers[w.buffer].data = np.frombuffer(np.ascontiguousarray(q.weight_q).tobytes(), np.uint8)
        model.buffers[b.buffer].data = np.frombuffer(q.bias_q.astype("<i4").tobytes(), np.uint8)
        _set_quant(w, q.weight_scale, np.zeros(len(q.weight_scale), np.int64))
        _set_quant(b, q.bias_scale, np.zeros(len(q.bias_scale), np.int64))
        _set_quant(y, q.output_scale, q.output_zero_point)
    return pack_flatbuffer(model, len(buf)), {"head": head, "feature_scale": feature_scale}


# Ops whose kernels read their output tensor's scale and zero-point when the interpreter (or
# the XNNPACK delegate) prepares them: changing those in the file is then consistent.
_REQUANTISING_OPS = {"FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D"}


def align_tflite_output(buf: bytes, threshold: float) -> bytes:
    """Rewrite the int8 output tensor's quantisation so `threshold` sits on a bin edge
    (toolchain.quantize.decision). Only when a requantising op writes the output directly."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    from toolchain.quantize.decision import threshold_aligned_qparams

    model = schema.ModelT.InitFromPackedBuf(buf, 0)
    sub = model.subgraphs[0]
    out_index = int(sub.outputs[0])
    tensor = sub.tensors[out_index]
    q = tensor.quantization
    if q is None or q.scale is None or len(q.scale) != 1:
        raise ToolchainError("int8 .tflite: the output has no per-tensor quantisation to align")
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    producer = next((op for op in sub.operators if out_index in list(op.outputs)), None)
    code = model.operatorCodes[producer.opcodeIndex] if producer is not None else None
    op_name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode)) if code is not None else None
    if op_name not in _REQUANTISING_OPS:
        raise ToolchainError(f"int8 .tflite: the output comes from {op_name}, whose quantisation cannot be "
                             "moved safely; cannot align it with the threshold")
    scale, zp = threshold_aligned_qparams(float(q.scale[0]), int(q.zeroPoint[0]), threshold)
    q.scale, q.zeroPoint = [scale], [zp]
    builder = flatbuffers.Builder(len(buf) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
