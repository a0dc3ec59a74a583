"""Bias correction of the TFLite converter's int8 graph (toolchain.export.tflite_bias_correction)."""

import json

import numpy as np
import pytest

from toolchain.quantize.int8_options import Int8Options

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """conv + bias -> PReLU-like -> conv + bias -> relu (fused) -> dense + bias."""
    rng = np.random.default_rng(0)
    k1, b1 = (tf.constant(v.astype(np.float32)) for v in (rng.normal(size=(3, 3, 3, 16)) / 3, rng.normal(size=16)))
    k2, b2 = (tf.constant(v.astype(np.float32)) for v in (rng.normal(size=(3, 3, 16, 16)) / 6, rng.normal(size=16)))
    w3, b3 = (tf.constant(v.astype(np.float32)) for v in (rng.normal(size=(8 * 8 * 16, 32)) / 30, rng.normal(size=32)))

    class Net(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32)])
        def __call__(self, x):
            y = tf.nn.conv2d(x, k1, 1, "SAME") + b1
            y = tf.nn.relu(tf.nn.conv2d(0.5 * y + tf.nn.relu(y), k2, 1, "SAME") + b2)
            return tf.matmul(tf.reshape(y, [1, -1]), w3) + b3

    net = Net()
    path = tmp_path_factory.mktemp("net") / "saved_model"
    tf.saved_model.save(net, str(path))
    x = rng.normal(size=(48, 8, 8, 3)).astype(np.float32)
    reference = np.stack([net(tf.constant(x[i:i + 1])).numpy()[0] for i in range(len(x))])
    return str(path), x, reference


def _outputs(buf: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=buf)
    interpreter.allocate_tensors()
    feed, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    (s_in, z_in), (s_out, z_out) = feed["quantization"], out["quantization"]
    ys = []
    for i in range(len(x)):
        interpreter.set_tensor(feed["index"], np.clip(np.round(x[i:i + 1] / s_in) + z_in, -128, 127).astype(np.int8))
        interpreter.invoke()
        ys.append((interpreter.get_tensor(out["index"])[0].astype(np.float64) - z_out) * s_out)
    return np.stack(ys)


def _clear_error(buf: bytes, x: np.ndarray, reference: np.ndarray, clear: np.ndarray) -> float:
    """Mean over channels of |mean int8 error| where `clear` holds (the values a correction measures)."""
    error = _outputs(buf, x) - reference
    return float(np.abs([error[..., c][clear[..., c]].mean() for c in range(reference.shape[-1])]).mean())


def _biases(buf: bytes) -> dict[str, np.ndarray]:
    from toolchain.export.tflite_flatbuffer import load_flatbuffer

    _, model = load_flatbuffer(buf)
    sub = model.subgraphs[0]
    return {f"op{k}": np.frombuffer(bytes(model.buffers[sub.tensors[op.inputs[2]].buffer].data), "<i4").copy()
            for k, op in enumerate(sub.operators) if len(op.inputs) > 2 and op.inputs[2] >= 0}


def test_bias_correction_removes_the_mean_output_error_of_every_biased_layer(saved_model):
    from toolchain.export.tflite_calibration import quantize_saved_model

    path, x, reference = saved_model
    plain = quantize_saved_model(path, x, Int8Options())
    corrected = quantize_saved_model(path, x, Int8Options(bias_correction=True))
    mean_error = {name: np.abs((_outputs(buf, x) - reference).mean(axis=0)).mean()
                  for name, buf in (("plain", plain), ("corrected", corrected))}
    assert mean_error["corrected"] < 0.5 * mean_error["plain"]
    before, after = _biases(plain), _biases(corrected)
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    # All three: the second conv's fused relu hides its mean only where it clamps.
    assert len(before) == 3 and len(changed) == 3


def test_the_fallback_judges_corrected_files_and_the_chosen_one_is_corrected_once(saved_model, monkeypatch):
    import toolchain.export.tflite_bias_correction as bc
    from toolchain.export.tflite_calibration import quantize_saved_model
    from toolchain.export.tflite_fallback import quantize_keeping_float

    path, x, _ = saved_model
    calls = []
    real = bc.correct_tflite_biases
    monkeypatch.setattr(bc, "correct_tflite_biases", lambda *a, **k: calls.append(1) or real(*a, **k))

    class Plan:  # stands in for FloatPlan: judges the all-int8 file, keeps it
        def float_ops(self, calibrated, finish=None):
            self.judged = finish(quantize_keeping_float(calibrated, []))
            self.plain = quantize_keeping_float(calibrated, [])
            return []

    plan, report = Plan(), {}
    written = quantize_saved_model(path, x, Int8Options(bias_correction=True), float_plan=plan, report=report)
    assert plan.judged == written != plan.plain and len(calls) == 1 and report["bias_correction"]["layers"] == 3


def _calibrated_and_quantized(path: str, x: np.ndarray) -> tuple[bytes, bytes]:
    """The converter's calibrated float graph of a saved_model and its full-integer file."""
    from tensorflow.lite.python import convert

    converter = tf.lite.TFLiteConverter.from_saved_model(path)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([tf.constant(x[i:i + 1])] for i in range(len(x)))
    converter.inference_input_type = converter.inference_output_type = tf.int8
    converter._experimental_calibrate_only = True
    calibrated = converter.convert()
    return calibrated, convert.mlir_quantize(calibrated, fully_quantize=True, input_data_type=tf.int8,
                                             output_data_type=tf.int8)


def test_the_correction_reports_what_it_did_and_needs_matching_tensors(saved_model):
    from toolchain.export.tflite_bias_correction import correct_tflite_biases

    path, x, _ = saved_model
    calibrated, quantized = _calibrated_and_quantized(path, x)
    buf, report = correct_tflite_biases(quantized, calibrated, x)
    assert report["layers"] == 3 and report["clamped_layers"] == 1 and report["mean_abs_shift"] > 0
    # A float graph with other tensor names matches nothing: the file is returned as it was.
    unrelated = tf.lite.TFLiteConverter.from_concrete_functions(
        [tf.function(lambda v: v * 2.0, input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32)])
         .get_concrete_function()]).convert()
    same, report = correct_tflite_biases(quantized, unrelated, x)
    assert same == quantized and report["layers"] == 0


@pytest.fixture(scope="module")
def relu_output_model(tmp_path_factory):
    """conv + bias -> relu (fused) as the output: the layer's error is seen only where it does not clamp."""
    rng = np.random.default_rng(1)
    k, b = rng.normal(size=(3, 3, 3, 24)).astype(np.float32) / 3, rng.normal(size=24).astype(np.float32)

    class Net(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32)])
        def __call__(self, x):
            return tf.nn.relu(tf.nn.conv2d(x, tf.constant(k), 1, "SAME") + tf.constant(b))

    net = Net()
    path = tmp_path_factory.mktemp("relu_net") / "saved_model"
    tf.saved_model.save(net, str(path))
    x = (rng.normal(size=(64, 8, 8, 3)) + 0.7).astype(np.float32)  # a mean for the weights' rounding to shift
    reference = np.stack([net(tf.constant(x[i:i + 1])).numpy()[0] for i in range(len(x))])
    return str(path), x, reference


def test_a_fused_relu_layer_is_corrected_where_its_float_output_is_clear_of_the_clamp(relu_output_model):
    from toolchain.export.tflite_bias_correction import CLAMP_MARGIN_STEPS
    from toolchain.export.tflite_calibration import quantize_saved_model

    path, x, reference = relu_output_model
    plain = quantize_saved_model(path, x, Int8Options())
    corrected = quantize_saved_model(path, x, Int8Options(bias_correction=True))
    assert not np.array_equal(_biases(plain)["op0"], _biases(corrected)["op0"])
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=plain)
    interpreter.allocate_tensors()
    step = interpreter.get_output_details()[0]["quantization"][0]
    clear = reference > CLAMP_MARGIN_STEPS * step
    error = {name: _clear_error(buf, x, reference, clear) for name, buf in (("plain", plain), ("corrected", corrected))}
    assert error["corrected"] < 0.5 * error["plain"]


def test_a_verifiers_per_user_layers_keep_their_biases(tmp_path):
    """As in the .pte's correction (tests/quantize/test_int8_options.py): the trunk's biases move,
    the per-user ones (film's last conv, the head) keep the converter's values."""
    import torch

    from toolchain.export import export_model
    from toolchain.models import build_model

    torch.manual_seed(0)
    model = build_model("verifier", width=4, film=True).eval()
    images = np.random.default_rng(0).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    biases = {}
    for corrected in (False, True):
        out = tmp_path / str(corrected)
        export_model(model, out, "tflite", "int8", images, threshold=0.0, progress=False,
                     int8={"bias_correction": corrected})
        biases[corrected] = _biases(next(out.glob("*_int8.tflite")).read_bytes())
        manifest = json.loads((out / "export_manifest.json").read_text())
        checks = next(a["checks"]["tflite"] for a in manifest["artifacts"] if a["precision"] == "int8")
        # The export's record says what the correction did, as the .pte's does.
        assert ("bias_correction" in checks) == corrected
        if corrected:
            assert checks["bias_correction"]["layers"] == 6 and checks["bias_correction"]["clamped_layers"] == 6
    changed = [k for k in biases[False] if not np.array_equal(biases[False][k], biases[True][k])]
    # Biased ops in graph order: the stem and five trunk convs, then features.12, head.0 and head.2.
    assert len(biases[False]) == 9
    assert changed and set(changed) <= set(list(biases[False])[:6])


def test_a_bias_buffer_that_several_ops_read_is_left_alone(tmp_path):
    """The converter gives bias-free layers of a width one shared zero bias (VarGFaceNet's PReLU
    branches): correcting it for one op would move the others, as it once broke that file."""
    from collections import Counter

    from toolchain.export.tflite_bias_correction import correct_tflite_biases
    from toolchain.export.tflite_flatbuffer import load_flatbuffer

    rng = np.random.default_rng(2)
    kernels = [tf.constant(rng.normal(size=(1, 1, 8, 8)).astype(np.float32) / 3) for _ in range(3)]

    class Net(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 8], tf.float32)])
        def __call__(self, x):
            for k in kernels:  # bias-free 1x1 convs, each with a fused relu
                x = tf.nn.relu(tf.nn.conv2d(x, k, 1, "SAME")) - 0.1
            return x

    path = str(tmp_path / "saved_model")
    tf.saved_model.save(Net(), path)
    x = (rng.normal(size=(32, 8, 8, 8)) + 0.5).astype(np.float32)
    calibrated, quantized = _calibrated_and_quantized(path, x)
    _, model = load_flatbuffer(quantized)
    sub = model.subgraphs[0]
    bias_buffer = {f"op{k}": sub.tensors[op.inputs[2]].buffer
                   for k, op in enumerate(sub.operators) if len(op.inputs) > 2 and op.inputs[2] >= 0}
    readers = Counter(bias_buffer.values())
    shared = [k for k, b in bias_buffer.items() if readers[b] > 1]
    assert len(bias_buffer) == 3 and shared  # the converter shares them
    buf, report = correct_tflite_biases(quantized, calibrated, x)
    assert report["layers"] == 3 - len(shared)
    before, after = _biases(quantized), _biases(buf)
    assert all(np.array_equal(before[k], after[k]) for k in shared)


def test_an_op_with_one_weight_per_channel_is_left_alone(tmp_path):
    """A 1x1 depthwise conv (the .tflite's PReLU branch, toolchain.export.int8_prelu) is exact in
    int8 on its per-channel scale: only the conv before it is corrected."""
    from toolchain.export.tflite_bias_correction import correct_tflite_biases

    rng = np.random.default_rng(3)
    k, b, scale, shift = (tf.constant(v.astype(np.float32)) for v in (
        rng.normal(size=(3, 3, 3, 8)) / 3, rng.normal(size=8), rng.uniform(0.2, 1.5, (1, 1, 8, 1)), rng.normal(size=8)))

    class Net(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32)])
        def __call__(self, x):
            y = tf.nn.conv2d(x, k, 1, "SAME") + b
            return tf.nn.relu(tf.nn.depthwise_conv2d(y, scale, [1, 1, 1, 1], "SAME") + shift)

    path = str(tmp_path / "saved_model")
    tf.saved_model.save(Net(), path)
    x = (rng.normal(size=(32, 8, 8, 3)) + 0.5).astype(np.float32)
    calibrated, quantized = _calibrated_and_quantized(path, x)
    buf, report = correct_tflite_biases(quantized, calibrated, x)
    before, after = _biases(quantized), _biases(buf)
    assert len(before) == 2 and report["layers"] == 1
    assert not np.array_equal(before["op0"], after["op0"]) and np.array_equal(before["op1"], after["op1"])


def test_values_past_the_int8_outputs_range_are_left_out_of_the_mean(tmp_path):
    """A conv whose int8 output range clips (as mse or percentile ranges do) is corrected for
    the error where it does not clip: raising its bias to make up for the clipped tails would
    move every unclipped value with it."""
    from ai_edge_litert.interpreter import Interpreter

    from toolchain.export.tflite_bias_correction import CLAMP_MARGIN_STEPS, correct_tflite_biases

    rng = np.random.default_rng(4)
    k, b = rng.normal(size=(3, 3, 3, 8)).astype(np.float32) / 3, rng.normal(size=8).astype(np.float32)

    class Net(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32)])
        def __call__(self, x):
            return tf.nn.conv2d(x, tf.constant(k), 1, "SAME") + tf.constant(b)

    net = Net()
    path = str(tmp_path / "saved_model")
    tf.saved_model.save(net, path)
    x = rng.uniform(-0.2, 1.0, size=(48, 8, 8, 3)).astype(np.float32)
    calibrated, quantized = _calibrated_and_quantized(path, x)
    # Images that follow the kernels' signs drive some outputs past the range x calibrated, with
    # pixels inside x's range, so the input itself does not clip.
    tiled = np.tile(k, (3, 3, 1, 1))[1:9, 1:9]  # (8, 8, 3, channel): the kernel at every 3x3 cell
    aligned = np.stack([np.where(tiled[..., j % 8] > 0, 1.0, -0.2) for j in range(24)])
    images = np.concatenate([x, aligned]).astype(np.float32)
    reference = np.stack([net(tf.constant(images[i:i + 1])).numpy()[0] for i in range(len(images))])
    corrected, report = correct_tflite_biases(quantized, calibrated, images)
    assert report["layers"] == 1 and report["mean_clamped_share"] > 0.002

    interpreter = Interpreter(model_content=quantized)
    interpreter.allocate_tensors()
    scale, zero = interpreter.get_output_details()[0]["quantization"]
    margin = CLAMP_MARGIN_STEPS * scale
    clear = (reference > (-128 - zero) * scale + margin) & (reference < (127 - zero) * scale - margin)
    error = {name: _clear_error(buf, images, reference, clear)
             for name, buf in (("plain", quantized), ("corrected", corrected))}
    # Measured: 0.0024 plain, 0.0002 corrected; with the clipped tails in the mean, 0.0054.
    assert error["corrected"] < 0.5 * error["plain"]
